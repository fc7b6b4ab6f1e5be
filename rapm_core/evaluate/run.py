"""Stage C's engine: run dir → RUN_DIR/eval/, the quality benchmark of one run.

Every sampler samples the same eval prompts from the same per-image noise; the registered metrics
(:mod:`rapm_core.evaluate.metrics`) compare them with the teacher's N·M-step reference, with real
renders (a domain's metric) or with Inception/CLIP (real teachers, weights supplied by the user).
The eval dir is written whole (temp dir, rename) and names the config and the run step it
measured, so a re-run with the same config on the same finished run does nothing.
"""

from __future__ import annotations

import time
from functools import reduce
from pathlib import Path
from typing import Callable

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.evaluate import scale
from rapm_core.evaluate.config import REFERENCE, EvaluateConfig
from rapm_core.evaluate.eval_dir import (
    EvalResult, already_evaluated, distill_seconds, log_row, prepare, sampler_row, write_eval_dir,
)
from rapm_core.evaluate.metrics import registered_metrics
from rapm_core.evaluate.samplers import SamplerSamples, eval_seed, run_sampler
from rapm_core.evaluate.trajectory_figure import trajectory_figure
from rapm_core.progress import Progress
from rapm_core.teacher import decode_latents, encode_prompts, encode_uncond, load_store_teacher, resolve_device
from rapm_core.trajectories.chain import initial_noise
from storage.run_dir import RunDir
from storage.teacher_fingerprint import check_teacher_unchanged


def evaluate_run(config: EvaluateConfig, progress: Callable[[Progress], None] | None = None,
                 log: Callable[[str], None] = print) -> EvalResult:
    """Sample, measure and write RUN_DIR/eval/ (metrics.json, grid.png, metrics.png, trajectory.png, report.md);
    with ``feature_store``, through the resumable store (:mod:`rapm_core.evaluate.scale`), in this process."""
    t_start = time.perf_counter()
    if (existing := already_evaluated(config, log, t_start)) is not None:
        return existing
    p = prepare(config)
    if config.feature_store is not None:
        return scale.evaluate_in_process(config, p, progress, log, t_start)
    schema, specs, student = p.store.schema, p.specs, p.student
    device = resolve_device(config.device)
    log(f"evaluating {config.run}: {len(specs)} samplers × {config.num_images} images "
        f"({len(p.texts)} eval prompts from {p.prompt_source}) on {device}")
    check_teacher_unchanged(schema, p.store.path)
    teacher = load_store_teacher(schema, device)
    cond = reduce(Conditioning.cat, [encode_prompts(teacher, p.prompts[a:a + config.batch_size])
                                     for a in range(0, len(p.prompts), config.batch_size)])
    uncond = encode_uncond(teacher)
    noise = initial_noise([eval_seed(config.seed, i) for i in range(config.num_images)],
                          teacher.latent_shape, teacher.dtype, device)
    step_seeds = [eval_seed(config.seed, i, "rapm-eval-steps") for i in range(config.num_images)]

    def decode(z: torch.Tensor) -> torch.Tensor:
        return decode_latents(teacher.pipe.vae, z)

    total, done_images, t_sampling = len(specs) * config.num_images, 0, time.perf_counter()

    def on_batch(n: int) -> None:
        nonlocal done_images
        done_images += n
        if progress is not None:
            progress(Progress(done_images, total, done_images / (time.perf_counter() - t_sampling), "images"))

    samples: dict[str, SamplerSamples] = {}
    for spec in specs:
        if spec.uses_student and not student.loaded:
            # From here on the UNet is the student, loaded the stock way a user of the export
            # loads it and fused as it would be deployed, so its speed is that of the bare UNet.
            student.load_into(teacher.pipe)
        samples[spec.name] = run_sampler(spec, teacher.unet, teacher.scheduler_config, decode, noise, cond, uncond,
                                         config.batch_size, on_batch, step_seeds)
        log(f"{spec.label}: {samples[spec.name].images_per_second:.3g} images/s")

    rows, notes = measure(config, samples, p.prompts, p.run, log)
    grid_n = min(config.grid_rows, config.num_images)
    grid = {samples[s.name].spec.label: samples[s.name].images[:grid_n] for s in specs}

    def figure(out: Path) -> None:
        trajectory_figure(p.store, teacher, student, decode, config.trajectory_rows, out)

    return write_eval_dir(config, p, rows, notes, grid, figure, str(device), log, t_start)


def measure(config: EvaluateConfig, samples: dict[str, SamplerSamples], prompts: list[str], run: RunDir,
            log: Callable[[str], None]) -> tuple[list[dict], list[str]]:
    """One row per sampler: its facts and every registered metric that applies to this evaluation."""
    notes = [f"images/s: sampling and VAE decoding, batch {config.batch_size}; NFE counts both CFG branches"]
    suite = [m for cls in registered_metrics() if (m := cls.create(config, prompts, samples[REFERENCE])) is not None]
    notes += [m.note for m in suite if m.note]
    if not any(m.distribution for m in suite):
        notes.append("no distribution metrics: pass --fid-weights and --clip-model (local weights) for a real teacher")
    rows = []
    for name, s in samples.items():
        row = sampler_row(s.spec, s.latents.shape[0], s.seconds)
        for metric in suite:
            row.update(metric.measure(s))
        if s.spec.uses_student:
            row["distill_seconds"] = distill_seconds(run)
        rows.append(row)
        log_row(row, log)
    return rows, notes

