"""The quality benchmark's measurements: a student or the teacher's samplers on the held-out
prompts, scored by the shapes domain's metric (``rapm_shapes.metric.ShapesDomain``), and what the
evaluator's features respond to (``image_statistics``).

A student is loaded the stock way (``load_lora_weights`` into a fresh pipeline, its exported
scheduler); noise per image comes from ``eval_seed(seed, i)``, so every method and every run at
one eval seed sees the same noise.
"""

from __future__ import annotations

from functools import reduce
from pathlib import Path

import numpy as np
import torch

from rapm_core.conditioning import Conditioning
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.metrics import Fidelity
from rapm_core.evaluate.samplers import SamplerSamples, SamplerSpec, eval_seed, sampler_specs, run_sampler
from rapm_core.evaluate.student import load_student_export
from rapm_core.pipeline import PipelineConfig
from rapm_core.ode import StockSampler, ode_for
from rapm_core.teacher import decode_latents, encode_prompts, encode_uncond, load_store_teacher
from rapm_core.trajectories.chain import initial_noise
from rapm_shapes import evaluator as judge
from rapm_shapes.metric import ShapesDomain, evaluator_images
from rapm_shapes.shapes import parse_caption
from storage.prompt_store import PromptStore
from storage.trajectory_store import TrajectoryStore

# euler_default: a flow teacher only (see _teacher_specs)
TEACHER_METHODS = ("teacher_ref", "teacher_ddim", "euler_default", "dpm_solver")
BATCH = 64


class Bench:
    """The teacher, the eval prompts and noise of one eval seed, and the metric."""

    def __init__(self, config: PipelineConfig, seed: int, num_images: int, reference: SamplerSamples | None = None):
        texts = [r.text for r in PromptStore(config.paths()["prompts"]).records("eval")]
        self.prompts = [texts[i % len(texts)] for i in range(num_images)]
        self.schema = TrajectoryStore(str(config.paths()["trajectories"])).schema
        self.teacher = load_store_teacher(self.schema)  # as the store encoded (an SD3 teacher's T5 tokens)
        self.cond = reduce(Conditioning.cat, [encode_prompts(self.teacher, self.prompts[a:a + BATCH])
                                              for a in range(0, num_images, BATCH)])
        self.uncond = encode_uncond(self.teacher)
        self.noise = initial_noise([eval_seed(seed, i) for i in range(num_images)], self.teacher.latent_shape,
                                   torch.float32, "cpu")
        self.step_seeds = [eval_seed(seed, i, "rapm-eval-steps") for i in range(num_images)]
        # with the teacher's reference samples of this noise: FID to the teacher and fidelity (PSNR, MSE) too
        self.metric = ShapesDomain.create(EvaluateConfig(run="-", evaluator="auto", render_seed=seed), self.prompts,
                                          reference=reference)
        self.fidelity = None if reference is None else Fidelity(reference)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.teacher.pipe.vae, z)

    def sample(self, spec: SamplerSpec, scheduler_config) -> torch.Tensor:
        return run_sampler(spec, self.teacher.unet, scheduler_config, self.decode, self.noise, self.cond, self.uncond,
                          BATCH, step_seeds=self.step_seeds)


def _scores(bench: Bench, samples) -> dict[str, float]:
    fidelity = {} if bench.fidelity is None else bench.fidelity.measure(samples)
    return {**bench.metric.measure(samples), **fidelity, "nfe": samples.spec.nfe, "label": samples.spec.label}


def _teacher_specs(bench: Bench) -> dict[str, SamplerSpec]:
    """The evaluation's samplers; for a flow teacher also N-step Euler on the stock pipeline's own
    default grid (``num_inference_steps=N``, no ``sigmas=``), which ends its last-but-one step at
    σ ≈ 1/T and so spends one of its N steps on almost nothing (``rapm_core.ode.flow``), beside
    ``teacher_ddim``'s Euler on the even pre-shift grid (the one RAPM and its student use)."""
    s = bench.schema
    specs = sampler_specs(s.scheduler_config, s.num_slots, s.steps_per_slot, s.guidance, load_student_stub(s.num_slots))
    ode = ode_for(s.scheduler_config)
    if ode.family == "flow":
        n, w = s.num_slots, s.guidance
        stock = StockSampler({"_class_name": "FlowMatchEulerDiscreteScheduler", **ode.scheduler_config}, n)
        specs["euler_default"] = SamplerSpec("euler_default", n, w, f"teacher Euler {n} steps, CFG {w:g}, stock default σ",
                                             stock)
    return specs


def measure_teachers(config_json: str, seed: int, num_images: int, methods: tuple[str, ...] = TEACHER_METHODS,
                     reference: SamplerSamples | None = None) -> dict[str, dict]:
    """The teacher's samplers at this N (those of ``methods`` it has) at one eval seed; with the
    ``reference`` samples (the N·M-step chain of this seed's noise) also their fidelity to it, and
    ``teacher_ref`` is scored from those samples instead of being sampled again."""
    torch.set_num_threads(1)
    config = PipelineConfig.model_validate_json(config_json)
    bench = Bench(config, seed, num_images, reference)
    specs = _teacher_specs(bench)

    def samples(m: str) -> SamplerSamples:
        if m == "teacher_ref" and reference is not None:
            return reference
        return bench.sample(specs[m], bench.teacher.scheduler_config)

    return {m: _scores(bench, samples(m)) for m in methods if m in specs}


def teacher_reference(config: PipelineConfig, seed: int, num_images: int) -> SamplerSamples:
    """The teacher's N·M-step samples of one eval seed's noise: the reference of fidelity and FID to the teacher."""
    bench = Bench(config, seed, num_images)
    return bench.sample(_teacher_specs(bench)["teacher_ref"], bench.teacher.scheduler_config)


def load_student_stub(num_steps: int):
    from rapm_core.evaluate.student import StudentExport

    return StudentExport(Path("-"), StockSampler({"_class_name": "DDIMScheduler"}, num_steps), "rapm")


def measure_student(config: PipelineConfig, run_dir: Path, seed: int, num_images: int,
                    reference: SamplerSamples | None = None) -> dict[str, float]:
    """The student of ``run_dir``'s export, loaded into a fresh pipeline, at one eval seed (with the
    teacher's ``reference`` samples of that seed: also FID to the teacher, latent MSE and PSNR)."""
    bench = Bench(config, seed, num_images, reference)
    student = load_student_export(run_dir / "export")
    student.load_into(bench.teacher.pipe)
    s = bench.schema
    spec = sampler_specs(s.scheduler_config, s.num_slots, s.steps_per_slot, s.guidance, student)["student"]
    return _scores(bench, bench.sample(spec, bench.teacher.scheduler_config))


# -- what the features respond to ---------------------------------------------------------------------
def image_statistics(images: torch.Tensor, prompts: list[str], model: judge.ShapesClassifier) -> dict[str, float]:
    """Per-set image statistics (images (B, H, W, 3) in [0, 1]): per-attribute accuracy, colour
    saturation, edge sharpness, background level, and the spread of the evaluator's features."""
    x = images.float().clamp(0, 1)
    mx, mn = x.max(dim=-1).values, x.min(dim=-1).values
    saturation = ((mx - mn) / mx.clamp(min=1e-6)).mean().item()
    gray = x.mean(dim=-1)
    sharpness = ((gray[:, 1:, :] - gray[:, :-1, :]).abs().mean() + (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean()).item()
    background = torch.quantile(gray.flatten(1), 0.1, dim=1).mean().item()
    ev = evaluator_images(images)
    feats = judge.features(model, ev)
    accuracy = judge.attribute_accuracy(judge.predict_attributes(model, ev), [parse_caption(p) for p in prompts])
    return {**{f"acc_{k}": v for k, v in accuracy.items()}, "saturation": saturation, "sharpness": sharpness,
            "background": background, "feature_spread": float(feats.std(dim=0).mean()),
            "feature_norm": float(feats.norm(dim=1).mean())}


def renders_as_images(renders: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(renders).float() / 255.0
