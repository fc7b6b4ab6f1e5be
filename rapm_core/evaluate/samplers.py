"""The quality benchmark's samplers: every sampler starts from the same noise for the same prompt,
so their images can be compared one to one with the teacher's reference.

Samplers (N slots, M teacher steps per slot, teacher guidance w, as the trajectory store fixes):

- ``teacher_ref``   the teacher's ODE, N·M steps, CFG w: what the student was trained to mimic
- ``teacher_ddim``  the teacher's ODE, N steps, CFG w: the naive few-step baseline (DDIM for VP
                    teachers, Euler for rectified flow)
- ``dpm_solver``    teacher DPM-Solver++ (2nd order multistep), N steps, CFG w
- ``student``       the distilled LoRA exactly as exported: its scheduler, steps and ``set_timesteps``
                    arguments, guidance 1

The teacher's ODE rows go through :func:`rapm_core.sampler.ode_sample`, the others through
:func:`rapm_core.sampler.sample_stock`, the one path the distilled student is sampled by anywhere.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.evaluate.measures import nfe_per_image
from rapm_core.evaluate.student import StudentExport
from rapm_core.ode import StockSampler, ode_for
from rapm_core.sampler import guided_prediction, ode_sample, sample_stock


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    num_steps: int
    guidance: float
    label: str  # for figures and tables
    # A stock scheduler setup (DPM-Solver++, the student's exported one); None: the teacher's ODE.
    stock: StockSampler | None = None

    @property
    def solver(self) -> str:
        """What steps it: ``ode`` (RAPM's arithmetic of the teacher's ODE) or a scheduler class."""
        return "ode" if self.stock is None else self.stock.class_name

    @property
    def nfe(self) -> int:
        return nfe_per_image(self.num_steps, self.guidance)

    @property
    def uses_student(self) -> bool:
        return self.name == "student"


def sampler_specs(scheduler_config: Mapping[str, Any] | Any, num_slots: int, steps_per_slot: int, guidance: float,
                  student: StudentExport) -> dict[str, SamplerSpec]:
    """Every sampler of the benchmark, for a teacher with ``scheduler_config`` (its ODE family names
    the few-step baseline) and the exported ``student``."""
    ode = ode_for(scheduler_config)
    n, nm, w, student_steps = num_slots, num_slots * steps_per_slot, guidance, student.num_steps
    solver = "DDIM" if ode.family == "vp" else "Euler"
    return {
        "teacher_ref": SamplerSpec("teacher_ref", nm, w, f"teacher {solver} {nm} steps, CFG {w:g}"),
        "teacher_ddim": SamplerSpec("teacher_ddim", n, w, f"teacher {solver} {n} steps, CFG {w:g}"),
        "dpm_solver": SamplerSpec("dpm_solver", n, w, f"DPM-Solver++ {n} steps, CFG {w:g}", ode.dpm_solver(n)),
        "student": SamplerSpec("student", student_steps, 1.0, f"{student.method.upper()} student {student_steps} steps",
                               student.sampler),
    }


def eval_seed(seed: int, index: int, stream: str = "rapm-eval") -> int:
    """The noise seed of evaluation image ``index``: independent of the sampler, the batch size and
    how many images are drawn, so every sampler and every re-run sees the same noise. A stochastic
    sampler's noise between steps comes from the ``rapm-eval-steps`` stream of the same image."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_latents(spec: SamplerSpec, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any,
                   latents: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                   step_seeds: list[int] | None = None, return_positions: bool = False) -> torch.Tensor:
    """Final latents (or every position) of one sampler for one batch (``unet`` carries the LoRA
    iff ``spec`` is the student; ``scheduler_config`` is the teacher's); ``step_seeds``: one per
    image, for a sampler that draws noise."""
    if spec.stock is None:
        return ode_sample(unet, scheduler_config, latents, cond, spec.num_steps, spec.guidance, uncond,
                          return_positions=return_positions)
    generators = None if step_seeds is None else [torch.Generator().manual_seed(int(s)) for s in step_seeds]
    return sample_stock(unet, spec.stock, latents, cond, spec.guidance, uncond, generators, return_positions)


@dataclass
class SamplerSamples:
    spec: SamplerSpec
    latents: torch.Tensor  # (K, C, H, W) final latents
    images: torch.Tensor  # (K, H, W, 3) in [0, 1]
    seconds: float  # sampling and decoding, all batches

    @property
    def images_per_second(self) -> float:
        return self.latents.shape[0] / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def run_sampler(spec: SamplerSpec, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any,
                decode: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor, cond: Conditioning,
                uncond: Conditioning | None, batch_size: int,
                on_batch: Callable[[int], None] | None = None, step_seeds: list[int] | None = None) -> SamplerSamples:
    """Sample and decode every image of one sampler in batches, timing the whole of it.

    One untimed UNet call at the batch shape first: CPU kernels and a freshly loaded LoRA pay a
    one-off set-up cost on their first call that would otherwise be charged to whichever sampler
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
    return SamplerSamples(spec, torch.cat(latents), torch.cat(images), time.perf_counter() - t0)
