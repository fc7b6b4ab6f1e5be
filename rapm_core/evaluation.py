"""The quality benchmark's samplers: every method starts from the same noise for the same prompt,
so their images can be compared one to one with the teacher's reference.

Methods (N slots, M teacher steps per slot, teacher guidance w, as the trajectory store fixes):

- ``teacher_ref``   teacher DDIM, N·M steps, CFG w: what the student was trained to mimic
- ``teacher_ddim``  teacher DDIM, N steps, CFG w: the naive few-step baseline
- ``dpm_solver``    teacher DPM-Solver++ (2nd order multistep), N steps, CFG w
- ``student``       the distilled LoRA, N steps, guidance 1

All DDIM methods go through :func:`rapm_core.sampler.ddim_sample`; DPM-Solver++ steps diffusers'
own ``DPMSolverMultistepScheduler`` exactly as a stock pipeline does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from rapm_core.conditioning import Conditioning
from rapm_core.embedded import evaluator as shapes_evaluator
from rapm_core.embedded.shapes import render_prompts
from rapm_core.errors import ConfigError
from rapm_core.metrics import finite_mean, latent_mse, nfe_per_image, psnr, to_uint8
from rapm_core.sampler import ddim_sample, guided_prediction
from rapm_core.schedule import inference_scheduler

METHODS = ("teacher_ref", "teacher_ddim", "dpm_solver", "student")
REFERENCE = "teacher_ref"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    num_steps: int
    guidance: float
    solver: str  # "ddim" or "dpmsolver++"
    label: str  # for figures and tables

    @property
    def nfe(self) -> int:
        return nfe_per_image(self.num_steps, self.guidance)

    @property
    def uses_student(self) -> bool:
        return self.name == "student"


def method_specs(num_slots: int, steps_per_slot: int, guidance: float, student_steps: int) -> dict[str, MethodSpec]:
    n, nm, w = num_slots, num_slots * steps_per_slot, guidance
    return {
        "teacher_ref": MethodSpec("teacher_ref", nm, w, "ddim", f"teacher DDIM {nm} steps, CFG {w:g}"),
        "teacher_ddim": MethodSpec("teacher_ddim", n, w, "ddim", f"teacher DDIM {n} steps, CFG {w:g}"),
        "dpm_solver": MethodSpec("dpm_solver", n, w, "dpmsolver++", f"DPM-Solver++ {n} steps, CFG {w:g}"),
        "student": MethodSpec("student", student_steps, 1.0, "ddim", f"RAPM student {student_steps} steps"),
    }


def eval_seed(seed: int, index: int) -> int:
    """The noise seed of evaluation image ``index``: independent of the method, the batch size and
    how many images are drawn, so every method and every re-run sees the same noise."""
    digest = hashlib.sha256(f"rapm-eval:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dpm_solver_scheduler(scheduler_config: Mapping[str, Any] | Any, num_steps: int) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ with the teacher's betas and parameterisation, on the same trailing grid as the
    DDIM methods (the teacher's own spacing may be SD's "leading", which starts below t = 999)."""
    cfg = {k: v for k, v in dict(getattr(scheduler_config, "config", scheduler_config)).items()
           if not k.startswith("_")}
    scheduler = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def dpm_solver_sample(unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any, latents: torch.Tensor,
                      cond: Conditioning, num_steps: int, guidance: float = 1.0,
                      uncond: Conditioning | None = None) -> torch.Tensor:
    """The stock pipeline's denoising loop with DPM-Solver++, on already-encoded conditioning."""
    scheduler = dpm_solver_scheduler(scheduler_config, num_steps)
    z = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = guided_prediction(unet, scheduler.scale_model_input(z, t), t, cond, guidance, uncond)
        z = scheduler.step(out, t, z).prev_sample
    return z


def sample_latents(spec: MethodSpec, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any,
                   latents: torch.Tensor, cond: Conditioning, uncond: Conditioning | None) -> torch.Tensor:
    """Final latents of one method for one batch (``unet`` carries the LoRA iff ``spec`` is the student)."""
    if spec.solver == "dpmsolver++":
        return dpm_solver_sample(unet, scheduler_config, latents, cond, spec.num_steps, spec.guidance, uncond)
    return ddim_sample(unet, scheduler_config, latents, cond, spec.num_steps, spec.guidance, uncond)


@dataclass
class MethodSamples:
    spec: MethodSpec
    latents: torch.Tensor  # (K, C, H, W) final latents
    images: torch.Tensor  # (K, H, W, 3) in [0, 1]
    seconds: float  # sampling and decoding, all batches

    @property
    def images_per_second(self) -> float:
        return self.latents.shape[0] / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def run_method(spec: MethodSpec, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any,
               decode: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor, cond: Conditioning,
               uncond: Conditioning | None, batch_size: int,
               on_batch: Callable[[int], None] | None = None) -> MethodSamples:
    """Sample and decode every image of one method in batches, timing the whole of it.

    One untimed UNet call at the batch shape first: CPU kernels and a freshly loaded LoRA pay a
    one-off set-up cost on their first call that would otherwise be charged to whichever method
    runs first.
    """
    b = min(batch_size, noise.shape[0])
    guided_prediction(unet, noise[:b], 0, cond[:b], spec.guidance, uncond)
    latents, images = [], []
    t0 = time.perf_counter()
    for a in range(0, noise.shape[0], batch_size):
        b = min(a + batch_size, noise.shape[0])
        z = sample_latents(spec, unet, scheduler_config, noise[a:b], cond[a:b], uncond)
        latents.append(z.float().cpu())
        images.append(decode(z))
        if on_batch is not None:
            on_batch(b - a)
    return MethodSamples(spec, torch.cat(latents), torch.cat(images), time.perf_counter() - t0)


def fidelity(samples: MethodSamples, reference: MethodSamples) -> dict[str, float | None]:
    """Distance to the reference from the same noise: latent MSE and image PSNR (dB, range 1)."""
    return {"latent_mse": float(latent_mse(samples.latents, reference.latents).mean()),
            "psnr": finite_mean(psnr(samples.images.permute(0, 3, 1, 2), reference.images.permute(0, 3, 1, 2)))}


def load_student_settings(export_dir: str | Path) -> tuple[dict, int]:
    """The exported scheduler config and step count (``inference.json``), as a user of the LoRA reads them."""
    export_dir = Path(export_dir)
    settings, scheduler_dir = export_dir / "inference.json", export_dir / "scheduler"
    if not settings.is_file() or not (scheduler_dir / "scheduler_config.json").is_file():
        raise ConfigError(f"{export_dir}: no exported student (inference.json, scheduler/); finish `rapm distill` first")
    steps = int(json.loads(settings.read_text(encoding="utf-8"))["num_inference_steps"])
    config = dict(inference_scheduler(json.loads((scheduler_dir / "scheduler_config.json").read_text())).config)
    return config, steps


def slot_boundaries(positions: torch.Tensor, steps_per_slot: int) -> torch.Tensor:
    """Positions (B, K+1, …) at every slot boundary, (B, N+1, …): the absolute targets z̃_N … z̃_0."""
    return positions[:, ::steps_per_slot]


# -- the embedded domain's judge ------------------------------------------------------------------
def evaluator_images(images: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, H, W, 3) in [0, 1] → the evaluator's input, quantised to uint8 on the way
    as the real renders are, so neither side is favoured by precision."""
    return to_uint8(images).float() / 127.5 - 1.0


def domain_metrics(model: shapes_evaluator.ShapesClassifier, images: torch.Tensor, prompts: list[str],
                   real_features: torch.Tensor) -> dict[str, float]:
    x = evaluator_images(images)
    resolution = model.config["resolution"]
    if tuple(x.shape[-2:]) != (resolution, resolution):
        raise ConfigError(f"the shapes evaluator reads {resolution}×{resolution} images; this teacher makes "
                          f"{x.shape[-1]}×{x.shape[-2]} (pass --evaluator none)")
    return {"domain_fid": shapes_evaluator.frechet_distance(shapes_evaluator.features(model, x), real_features),
            "prompt_adherence": shapes_evaluator.prompt_adherence(model, x, prompts)}


def real_render_features(model: shapes_evaluator.ShapesClassifier, prompts: list[str], seed: int) -> torch.Tensor:
    """Evaluator features of real renders for the same prompts (the domain FID's reference set)."""
    renders = render_prompts(prompts, seed, model.config["resolution"])
    return shapes_evaluator.features(model, shapes_evaluator.images_from_uint8(np.asarray(renders)))
