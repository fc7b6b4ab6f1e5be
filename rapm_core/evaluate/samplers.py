"""The quality benchmark's samplers: every method starts from the same noise for the same prompt,
so their images can be compared one to one with the teacher's reference.

Methods (N slots, M teacher steps per slot, teacher guidance w, as the trajectory store fixes):

- ``teacher_ref``   teacher DDIM, N·M steps, CFG w: what the student was trained to mimic
- ``teacher_ddim``  teacher DDIM, N steps, CFG w: the naive few-step baseline
- ``dpm_solver``    teacher DPM-Solver++ (2nd order multistep), N steps, CFG w
- ``student``       the distilled LoRA, N steps, guidance 1, with the scheduler it was exported with

All DDIM methods go through :func:`rapm_core.sampler.ddim_sample`; DPM-Solver++ and LCM step
diffusers' own schedulers exactly as a stock pipeline does (:func:`rapm_core.sampler.scheduler_sample`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

from rapm_core.conditioning import Conditioning
from rapm_core.evaluate.measures import nfe_per_image
from rapm_core.evaluate.student import StudentExport
from rapm_core.sampler import ddim_sample, guided_prediction, scheduler_sample


@dataclass(frozen=True)
class MethodSpec:
    name: str
    num_steps: int
    guidance: float
    solver: str  # "ddim", "dpmsolver++" or "lcm"
    label: str  # for figures and tables

    @property
    def nfe(self) -> int:
        return nfe_per_image(self.num_steps, self.guidance)

    @property
    def uses_student(self) -> bool:
        return self.name == "student"


def method_specs(num_slots: int, steps_per_slot: int, guidance: float, student: StudentExport) -> dict[str, MethodSpec]:
    n, nm, w, student_steps = num_slots, num_slots * steps_per_slot, guidance, student.num_steps
    return {
        "teacher_ref": MethodSpec("teacher_ref", nm, w, "ddim", f"teacher DDIM {nm} steps, CFG {w:g}"),
        "teacher_ddim": MethodSpec("teacher_ddim", n, w, "ddim", f"teacher DDIM {n} steps, CFG {w:g}"),
        "dpm_solver": MethodSpec("dpm_solver", n, w, "dpmsolver++", f"DPM-Solver++ {n} steps, CFG {w:g}"),
        "student": MethodSpec("student", student_steps, 1.0, student.solver,
                              f"{student.method.upper()} student {student_steps} steps"),
    }


def eval_seed(seed: int, index: int, stream: str = "rapm-eval") -> int:
    """The noise seed of evaluation image ``index``: independent of the method, the batch size and
    how many images are drawn, so every method and every re-run sees the same noise. A stochastic
    sampler's noise between steps comes from the ``rapm-eval-steps`` stream of the same image."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dpm_solver_scheduler(scheduler_config: Mapping[str, Any] | Any, num_steps: int) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ with the teacher's betas and parameterisation, on the same trailing grid as the
    DDIM methods (the teacher's own spacing may be SD's "leading", which starts below t = 999)."""
    cfg = {k: v for k, v in dict(getattr(scheduler_config, "config", scheduler_config)).items()
           if not k.startswith("_")}
    scheduler = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    return scheduler


def dpm_solver_sample(unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any, latents: torch.Tensor,
                      cond: Conditioning, num_steps: int, guidance: float = 1.0,
                      uncond: Conditioning | None = None) -> torch.Tensor:
    """The stock pipeline's denoising loop with DPM-Solver++, on already-encoded conditioning."""
    return scheduler_sample(unet, dpm_solver_scheduler(scheduler_config, num_steps), latents, cond, num_steps,
                            guidance, uncond)


def sample_latents(spec: MethodSpec, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any,
                   latents: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                   step_seeds: list[int] | None = None, return_positions: bool = False) -> torch.Tensor:
    """Final latents (or every position) of one method for one batch (``unet`` carries the LoRA
    iff ``spec`` is the student); ``step_seeds``: one per image, for a sampler that draws noise."""
    if spec.solver == "dpmsolver++":
        scheduler = dpm_solver_scheduler(scheduler_config, spec.num_steps)
    elif spec.solver == "lcm":
        scheduler = LCMScheduler.from_config(scheduler_config)
    else:
        return ddim_sample(unet, scheduler_config, latents, cond, spec.num_steps, spec.guidance, uncond,
                           return_positions=return_positions)
    generators = None if step_seeds is None else [torch.Generator().manual_seed(int(s)) for s in step_seeds]
    return scheduler_sample(unet, scheduler, latents, cond, spec.num_steps, spec.guidance, uncond, generators,
                            return_positions=return_positions)


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
               on_batch: Callable[[int], None] | None = None, step_seeds: list[int] | None = None) -> MethodSamples:
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
        z = sample_latents(spec, unet, scheduler_config, noise[a:b], cond[a:b], uncond,
                           None if step_seeds is None else step_seeds[a:b])
        latents.append(z.float().cpu())
        images.append(decode(z))
        if on_batch is not None:
            on_batch(b - a)
    return MethodSamples(spec, torch.cat(latents), torch.cat(images), time.perf_counter() - t0)
