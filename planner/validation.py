"""The planner against a real run: the same stage on CPU with real tensors, measured two ways.

The real run is the project's code, not the planner's: ``Trainer.train_step`` of any method on
the full N-slot grid, ``teacher_trajectories`` with every one of its N·M UNet calls, real random
weights; or (``measure_run``) the distillation engine's own trainer on a real store, with the
UNet loaded as ``rapm distill`` loads it (``--weights-dtype``).
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

from planner.architecture import Architecture
from planner.config import PlanConfig
from rapm_core.distill.config import DistillRunConfig
from rapm_core.distill.data import load_example
from planner.engine import MethodConfig, Trainer, build_trainer, teacher_trajectories
from planner.meta_memory import MemoryCounter, module_tensors, optimizer_tensors
from planner.planner import architecture
from planner.presets import preset_configs
from planner.stages import STAGES, encode, training_inputs
from rapm_core.ode import SlotGrid
from rapm_core.teacher import DTYPES
from storage.trajectory_store import TrajectoryStore

_PAGE = os.sysconf("SC_PAGE_SIZE")
CPU = torch.device("cpu")


def mid_size(width: int = 64, text_dim: int = 256, preset: str = "sd15") -> Architecture:
    """A preset's block layout (levels, layers, transformer depths, attention placement) with
    every width divided by 320/``width``, 2-layer CLIP text encoders of ``text_dim`` and a small
    8× VAE: a UNet of tens of millions of parameters whose 256 px step runs in seconds on one core."""
    _, configs = preset_configs(preset)
    levels = len(configs["unet"]["block_out_channels"])
    widths = [width * c // 320 for c in configs["unet"]["block_out_channels"]]
    encoders = [sub for sub in ("text_encoder", "text_encoder_2") if sub in configs]
    unet = {**configs["unet"], "block_out_channels": widths, "cross_attention_dim": text_dim * len(encoders),
            "sample_size": 32}
    if preset == "sdxl":
        # SDXL counts heads (attention_head_dim is a head count there): one per 32 channels.
        unet.update(attention_head_dim=[max(1, c // 32) for c in widths],
                    projection_class_embeddings_input_dim=text_dim + 6 * unet["addition_time_embed_dim"])
    text = {"hidden_size": text_dim, "intermediate_size": 4 * text_dim, "num_attention_heads": 4,
            "num_hidden_layers": 2, "projection_dim": text_dim}
    vae = {**configs["vae"], "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "sample_size": 256}
    index = configs["model_index"]
    name = "SD 1.5" if preset == "sd15" else "SDXL"
    return Architecture(f"{name} layout at width {width} ({levels} levels)", preset, unet, vae, configs["scheduler"],
                        tuple((index[sub][1], {**configs[sub], **text}) for sub in encoders))


def mid_size_sd3(width: int = 256, layers: int = 6, text_dim: int = 128, t5_tokens: int = 32,
                 preset: str = "sd35-medium") -> Architecture:
    """An SD3-class preset's layout (joint blocks, SD3.5's dual-attention blocks and q/k norm, patch
    size, 16 latent channels, three text encoders, the flow scheduler) at ``width`` channels (32 per
    head) and ``layers`` blocks, 2-layer CLIPs of ``text_dim``, a 2-layer T5 of 2·``text_dim`` and a
    small 8× VAE: what ``rapm_testing/tiny_sd3.py`` builds, scaled up to millions of parameters
    whose 256 px step still takes seconds on one core."""
    _, configs = preset_configs(preset)
    t5_dim = 2 * text_dim
    dual = [i for i in configs["transformer"].get("dual_attention_layers", ()) if i < layers // 2]
    transformer = {**configs["transformer"], "attention_head_dim": 32, "num_attention_heads": width // 32,
                   "num_layers": layers, "caption_projection_dim": width, "joint_attention_dim": t5_dim,
                   "pooled_projection_dim": 2 * text_dim, "pos_embed_max_size": 64, "sample_size": 32,
                   "dual_attention_layers": dual}
    clip = {"hidden_size": text_dim, "intermediate_size": 4 * text_dim, "num_attention_heads": 4,
            "num_hidden_layers": 2, "projection_dim": text_dim}
    t5 = {**configs["text_encoder_3"], "d_model": t5_dim, "d_ff": 2 * t5_dim, "d_kv": 32, "num_heads": 4,
          "num_layers": 2, "vocab_size": 1000}
    vae = {**configs["vae"], "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "sample_size": 256}
    index = configs["model_index"]
    encoders = tuple((index[sub][1], {**configs[sub], **clip}) for sub in ("text_encoder", "text_encoder_2"))
    return Architecture(f"{preset} layout at width {width} ({layers} blocks)", "sd3", transformer, vae,
                        configs["scheduler"], (*encoders, (index["text_encoder_3"][1], t5)), t5_tokens)


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


def _real_unet(arch: Architecture, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return arch.build_denoiser(dtype, "cpu")


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


def foreach_steps(trainer: Trainer) -> None:
    """Step both optimizers as on CUDA (foreach), as the planner plans them."""
    for opt in (trainer.g_optimizer, trainer.d_optimizer):
        for group in (opt.param_groups if opt is not None else []):
            group["foreach"] = True


def measure_steps(trainer: Trainer, example, seed: int = 0, extra: tuple[torch.Tensor, ...] = ()) -> dict:
    """Iteration 1 (the planner's: a LoRA step under either schedule) after iteration 0, which
    creates the AdamW states; ``extra``: tensors outside the trainer that stay alive (the example)."""
    foreach_steps(trainer)
    trainer.train_step(example, torch.Generator().manual_seed(seed), 0)

    def baseline() -> Iterator[torch.Tensor]:
        yield from module_tensors(trainer.unet, trainer.heads)
        yield from optimizer_tensors(trainer.g_optimizer, trainer.d_optimizer)
        yield from trainer.student.ode.tensors()
        uncond = getattr(trainer.method, "uncond", None)
        if uncond is not None:
            yield from uncond.tensors()
        yield from extra

    return _measure(baseline, lambda: trainer.train_step(example, torch.Generator().manual_seed(seed + 1), 1))


def measure_distill(arch: Architecture, config: PlanConfig, seed: int = 0) -> dict:
    """One steady-state iteration of the planned method on CPU, all N slots, random weights."""
    method = config.distill_method()
    scheduler = arch.scheduler_config()
    grid = SlotGrid.from_scheduler(scheduler, config.slots, config.steps_per_slot)
    g = torch.Generator().manual_seed(seed)
    example, teacher = training_inputs(arch, config, lambda *shape: torch.randn(*shape, generator=g))
    unet = _real_unet(arch, DTYPES[method.training.weights_dtype], seed)
    trainer = Trainer(unet, scheduler, grid, method, device="cpu", teacher=teacher)
    return measure_steps(trainer, example, seed, (example.positions, *example.cond.tensors()))


def run_plan_config(store_path: str, method: MethodConfig) -> PlanConfig:
    """The plan of distilling ``store_path`` with ``method``: its teacher, grid, guidance and dtype
    (and an SD3-class store's T5 token count, which sets its embeddings' length)."""
    schema = TrajectoryStore(store_path).schema
    tokens = {} if schema.max_sequence_length is None else {"max_sequence_length": schema.max_sequence_length}
    return PlanConfig(teacher=schema.teacher, slots=schema.num_slots, steps_per_slot=schema.steps_per_slot,
                      guidance=schema.guidance, precision=schema.compute_dtype, method=method, **tokens)


def measure_run(store_path: str, config: PlanConfig, seed: int = 0) -> dict:
    """The engine's own iteration: ``build_trainer`` on the store (the UNet as ``rapm distill``
    loads it, in ``--weights-dtype``) and a stored trajectory, one steady-state step on CPU."""
    store = TrajectoryStore(store_path)
    run = DistillRunConfig(trajectories=store_path, out="unused", device="cpu", seed=seed,
                           **config.distill_method().model_dump())
    example = load_example(store, int(store.complete_indices()[0]))
    trainer = build_trainer(run, store)
    return measure_steps(trainer, example, seed, (example.positions, *example.cond.tensors()))


def measure_trajectories(arch: Architecture, config: PlanConfig, seed: int = 0) -> dict:
    """Stage A on CPU: text encoders and UNet resident; the prompts encoded by the real
    encoder; every one of the N·M guided steps; the float copy before writing."""
    dtype = DTYPES[config.precision]
    unet, encoders = _real_unet(arch, dtype, seed), arch.build_text_encoders(dtype, "cpu")
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
        host = z.detach().float()  # generate_trajectories' copy before .cpu() (a no-op in fp32)
        del host, z

    return _measure(lambda: iter([*module_tensors(unet, *encoders), noise]), run)


MEASURES = {"distill": measure_distill, "trajectories": measure_trajectories}


def _ratios(stage: str, predicted, measured: dict) -> dict:
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


def compare(stage: str, arch: Architecture, config: PlanConfig) -> dict:
    """Planner (meta) vs the real CPU run for one stage; ratios are predicted / measured."""
    return _ratios(stage, STAGES[stage](arch, config), MEASURES[stage](arch, config))


def compare_run(store_path: str, method: MethodConfig) -> dict:
    """Planner (meta, from the teacher's config files) vs the engine's own trainer on the store."""
    config = run_plan_config(store_path, method)
    predicted = STAGES["distill"](architecture(config), config)
    return _ratios("distill", predicted, measure_run(store_path, config))
