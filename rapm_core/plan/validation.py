"""The planner against a real run: the same stage on CPU with real tensors, measured two ways.

The real run is the project's code, not the planner's: ``Distiller.train_step`` on the full
N-slot grid, ``teacher_trajectories`` with every one of its N·M UNet calls, real random weights.
Its memory is measured as the live-tensor peak (the same counting mode, on CPU storages: what
a caching allocator's "allocated" counter would report) and as the process's RSS growth,
which adds what no tensor count sees (the allocator keeping freed blocks, oneDNN scratch
space). The planner predicts from meta tensors with its shortcuts (one slot, one real UNet call,
fused attention, fake scalars); the ratio checks all of them at once.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Callable, Iterator

import torch
from diffusers import UNet2DConditionModel

from rapm_core.conditioning import Conditioning
from rapm_core.plan.architecture import Architecture
from rapm_core.plan.config import PlanConfig
from rapm_core.plan.engine import Distiller, Example, teacher_trajectories
from rapm_core.plan.meta_memory import MemoryCounter, module_tensors, optimizer_tensors
from rapm_core.plan.presets import preset_configs
from rapm_core.plan.stages import STAGES, encode
from rapm_core.schedule import SlotGrid
from rapm_core.teacher import DTYPES

_PAGE = os.sysconf("SC_PAGE_SIZE")
CPU = torch.device("cpu")


def mid_size(width: int = 64, text_dim: int = 256) -> Architecture:
    """SD 1.5's block layout (4 levels, 2 layers each, attention on the first three) with every
    width divided by 320/``width``, a 2-layer CLIP text encoder and a small 8× VAE: a UNet of
    tens of millions of parameters whose 256 px step runs in seconds on one core."""
    _, configs = preset_configs("sd15")
    unet = {**configs["unet"], "block_out_channels": [width, 2 * width, 4 * width, 4 * width],
            "cross_attention_dim": text_dim, "sample_size": 32}
    text = {**configs["text_encoder"], "hidden_size": text_dim, "intermediate_size": 4 * text_dim,
            "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": text_dim}
    vae = {**configs["vae"], "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "sample_size": 256}
    return Architecture(f"SD 1.5 layout at width {width}", "sd15", unet, vae, configs["scheduler"],
                        (("CLIPTextModel", text),))


class PeakRSS:
    """Peak resident set growth of this process during the block (sampled every 2 ms from
    /proc/self/statm; a peak shorter than that can be missed)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _real_unet(arch: Architecture, dtype: torch.dtype, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return arch.build_unet(dtype, "cpu")


def _random_cond(arch: Architecture, dtype: torch.dtype, batch: int, g: torch.Generator) -> Conditioning:
    return Conditioning(torch.randn(batch, arch.text_length, arch.embed_dim, generator=g).to(dtype))


def _trim_heap() -> None:
    # Give memory freed by earlier work back to the OS (glibc), so the RSS growth of the
    # measured block is the block's own, not hidden by pages the allocator kept.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _measure(baseline: Callable[[], Iterator[torch.Tensor]], run: Callable[[], None]) -> dict:
    """Peak of ``run`` over what ``baseline()`` yields; nothing here keeps a reference to those
    tensors, so what the run frees (last iteration's gradients) really goes."""
    counter = MemoryCounter("cpu")
    resident = counter.track(baseline())
    gc.collect()
    _trim_heap()
    with PeakRSS() as rss, counter:
        run()
    return {"peak_bytes": counter.peak, "resident_bytes": resident, "working_bytes": counter.peak - resident,
            "rss_growth_bytes": rss.growth}


def measure_distill(arch: Architecture, config: PlanConfig, seed: int = 0) -> dict:
    """One steady-state RAPM iteration on CPU (the second; the first creates the AdamW states)."""
    if config.method.method != "rapm":
        raise ValueError("the CPU validation runs the project's Distiller (method rapm)")
    dtype = DTYPES[config.precision]
    scheduler = arch.scheduler_config()
    grid = SlotGrid.from_scheduler(scheduler, config.slots, config.steps_per_slot)
    trainer = Distiller(_real_unet(arch, dtype, seed), scheduler, grid, config.method.distill_config(), device="cpu")
    for opt in (trainer.g_optimizer, trainer.d_optimizer):
        for group in (opt.param_groups if opt is not None else []):
            group["foreach"] = True  # as on CUDA, and as the planner steps
    g = torch.Generator().manual_seed(seed)
    c, h, w = arch.latent_shape(config.resolution)
    positions = torch.randn(grid.total_steps + 1, c, h, w, generator=g)
    example = Example(positions, _random_cond(arch, torch.float32, 1, g), 0)
    trainer.train_step(example, torch.Generator().manual_seed(seed))

    def baseline() -> Iterator[torch.Tensor]:
        yield from module_tensors(trainer.unet, trainer.heads)
        yield from optimizer_tensors(trainer.g_optimizer, trainer.d_optimizer)
        yield from (trainer.alphas_cumprod, example.positions, example.cond.prompt_embeds)

    return _measure(baseline, lambda: trainer.train_step(example, torch.Generator().manual_seed(seed + 1)))


def measure_trajectories(arch: Architecture, config: PlanConfig, seed: int = 0) -> dict:
    """Stage A on CPU: text encoder, UNet and VAE resident; the prompts encoded by the real
    encoder; every one of the N·M guided steps; the float copy before writing."""
    dtype = DTYPES[config.precision]
    unet = _real_unet(arch, dtype, seed)
    vae, encoders = arch.build_vae(dtype, "cpu"), arch.build_text_encoders(dtype, "cpu")
    grid = SlotGrid.from_scheduler(arch.scheduler_config(), config.slots, config.steps_per_slot)
    c, h, w = arch.latent_shape(config.resolution)
    batch = config.trajectory_batch
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, c, h, w, generator=g).to(dtype)

    @torch.no_grad()
    def run() -> None:
        cond = encode(arch, encoders, batch, dtype, CPU)
        uncond = encode(arch, encoders, 1, dtype, CPU)
        z = teacher_trajectories(unet, arch.scheduler_config(), grid, noise, cond, uncond, config.guidance)
        host = z.detach().float()  # flows.trajectories' copy before .cpu() (a no-op in fp32)
        del host, z

    return _measure(lambda: iter([*module_tensors(unet, vae, *encoders), noise]), run)


MEASURES = {"distill": measure_distill, "trajectories": measure_trajectories}


def compare(stage: str, arch: Architecture, config: PlanConfig) -> dict:
    """Planner (meta) vs the real CPU run for one stage; ratios are predicted / measured."""
    predicted = STAGES[stage](arch, config)
    measured = MEASURES[stage](arch, config)
    predicted_working = predicted.peak_bytes - sum(predicted.resident.values())
    return {
        "stage": stage,
        "predicted_peak_bytes": predicted.peak_bytes,
        "predicted_working_bytes": predicted_working,
        **{f"measured_{k}": v for k, v in measured.items()},
        "ratio_live": predicted.peak_bytes / measured["peak_bytes"],
        "ratio_working_vs_rss": (predicted_working / measured["rss_growth_bytes"]
                                 if measured["rss_growth_bytes"] else None),
    }
