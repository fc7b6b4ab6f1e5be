"""Stage C at the paper's scale: sample into a resumable, shardable feature store, then measure.

With ``--feature-store`` every sampler's images are made one batch at a time, each batch's
per-image features (every registered :class:`~rapm_core.evaluate.metrics.FeatureMetric`: Inception
pool features, CLIP score terms) are written as one chunk of :class:`storage.eval_store.EvalStore`
and then flagged complete, and the images themselves are dropped (30K images per sampler would be
24 GB of uint8 at 512²), except the report grid's first few. A re-run skips complete batches; shards
(:func:`evaluate_range` on Dask workers, ``flows.evaluate``) own batch-aligned index ranges. Image
``i``'s noise and prompt depend only on ``i`` and its batch is the one an uninterrupted run makes,
so an interrupted, resumed or sharded run stores bit-identical features (on one kind of device).
The metrics are then computed from the store (:func:`finish`), never from images in memory.

Fidelity to the reference (latent MSE, PSNR) and a domain's metrics compare whole images and
are not measured here; the report says so.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rapm_core.evaluate import features
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.measures import to_uint8
from rapm_core.evaluate.metrics import feature_metrics, registered_metrics
from rapm_core.evaluate.eval_dir import (
    EvalResult, Prepared, distill_seconds, eval_config_hash, log_row, sampler_row, write_eval_dir,
)
from rapm_core.evaluate.samplers import SamplerSpec, eval_seed, sample_latents
from rapm_core.evaluate.trajectory_figure import trajectory_figure
from rapm_core.execution import worker_cached
from rapm_core.progress import Progress
from rapm_core.sampler import guided_prediction
from rapm_core.teacher import (
    Teacher, decode_latents, encode_prompts, encode_uncond, load_store_teacher, resolve_device,
)
from rapm_core.trajectories.chain import initial_noise
from storage.eval_store import EvalStore, EvalStoreSchema, check_compatible, exists
from storage.hashing import config_hash
from storage.locks import DirLock
from storage.teacher_fingerprint import check_teacher_unchanged
from storage.urls import is_url


def store_lock(path: str):
    """One coordinator per local feature store (its shards write disjoint chunks under it)."""
    from contextlib import nullcontext

    return nullcontext() if is_url(path) else DirLock.beside(path, what="feature store")


def wanted_identity(config: EvaluateConfig, p: Prepared) -> dict:
    """The store identity this evaluation needs, known before any model loads (a missing feature
    network file fails here, first)."""
    schema = p.store.schema
    return {"run_config_hash": p.record["config_hash"], "run_step": p.done["step"], "teacher": schema.teacher,
            "teacher_fingerprint": schema.teacher_fingerprint, "seed": config.seed,
            "num_images": config.num_images, "batch_size": config.batch_size,
            "prompts_hash": config_hash({"prompts": p.prompts}),
            "grid_images": min(config.grid_rows, config.num_images),
            "metrics": {m.name: c for m in feature_metrics() if (c := m.feature_config(config)) is not None}}


def preflight(config: EvaluateConfig, p: Prepared) -> None:
    """The cheap checks before any model loads or cluster starts: the store's identity, the feature
    networks' files and the FID reference (a bad one would otherwise surface after all the sampling)."""
    check_compatible(config.feature_store, wanted_identity(config, p))
    if config.fid_weights and config.fid_reference:
        features.check_reference_source(config.fid_reference)


def spec_record(spec: SamplerSpec) -> dict:
    return {"num_steps": spec.num_steps, "guidance": spec.guidance, "solver": spec.solver, "label": spec.label}


@dataclass
class WorkerModels:
    """What one worker process holds for one kind of sampler: the pipeline (its UNet fused with the
    student's LoRA for the student) and the feature extractors."""

    teacher: Teacher
    extractors: list[Callable[[torch.Tensor, list[str]], dict[str, np.ndarray]]]

    def features(self, images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for extract in self.extractors:
            out.update(extract(images, prompts))
        return out


def worker_models(config: EvaluateConfig, p: Prepared, student: bool) -> WorkerModels:
    """This process's models, loaded once per worker (``worker_cached``: one at a time, so the
    teacher samplers' shards run before the student's)."""
    schema = p.store.schema
    key = ("rapm-eval", schema.teacher, schema.teacher_fingerprint, schema.compute_dtype, config.device,
           config.fid_weights, config.clip_model, (p.record["config_hash"], p.done["step"]) if student else None)

    def load() -> WorkerModels:
        device = resolve_device(config.device)
        check_teacher_unchanged(schema, p.store.path)
        teacher = load_store_teacher(schema, device)
        if student:
            p.student.load_into(teacher.pipe)  # the stock diffusers way, fused as deployed
        extractors = [m.extractor(config, device) for m in feature_metrics() if m.feature_config(config) is not None]
        return WorkerModels(teacher, extractors)

    return worker_cached(key, load)


def open_feature_store(config: EvaluateConfig, p: Prepared) -> EvalStore:
    """The feature store with a group for every sampler, created if absent (the first writer learns
    the image size and feature shapes from a probe batch); a store of another identity is refused."""
    preflight(config, p)
    wanted = wanted_identity(config, p)
    if not exists(config.feature_store):
        s = worker_models(config, p, student=False)
        h, w = (d * s.teacher.pipe.vae_scale_factor for d in p.store.schema.latent_shape[1:])
        probe = s.features(torch.zeros(1, 3, h, w, dtype=torch.uint8), [p.prompts[0]])
        schema = EvalStoreSchema(**wanted, image_size=(h, w), feature_shapes={k: list(v.shape[1:])
                                                                               for k, v in probe.items()},
                                 config=config.model_dump(mode="json"), created_by=f"rapm {version('rapm')}",
                                 eval_config_hash=eval_config_hash(config))
        EvalStore.create(config.feature_store, schema, p.prompts)
    store = EvalStore(config.feature_store, writable=True)
    for spec in p.specs:
        store.ensure_method(spec.name, spec_record(spec))
    return store


def pending_images(config: EvaluateConfig, p: Prepared, store: EvalStore) -> int:
    return sum(b - a for s in p.specs for a, b in store.pending_batches(s.name, 0, config.num_images))


@torch.no_grad()
def evaluate_range(config: EvaluateConfig, p: Prepared, method: str, start: int, stop: int,
                   on_batch: Callable[[int], None] | None = None) -> int:
    """Sample, decode and store the features of images [start, stop) of one sampler; returns how many
    were made (complete batches are skipped, and nothing is loaded when none is missing)."""
    store = EvalStore(config.feature_store, writable=True)
    pending = store.pending_batches(method, start, stop)
    if not pending:
        return 0
    spec = next(s for s in p.specs if s.name == method)
    s = worker_models(config, p, spec.uses_student)
    teacher = s.teacher
    uncond = encode_uncond(teacher)
    grid_n, made = store.schema.grid_images, 0
    for i, (a, b) in enumerate(pending):
        cond = encode_prompts(teacher, p.prompts[a:b])
        noise = initial_noise([eval_seed(config.seed, j) for j in range(a, b)], teacher.latent_shape,
                              teacher.dtype, teacher.device)
        if i == 0:  # untimed warm-up, as run_sampler does: first calls pay one-off set-up costs
            guided_prediction(teacher.unet, noise, 0, cond, spec.guidance, uncond)
        t0 = time.perf_counter()
        z = sample_latents(spec, teacher.unet, teacher.scheduler_config, noise, cond, uncond,
                           [eval_seed(config.seed, j, "rapm-eval-steps") for j in range(a, b)])
        images = decode_latents(teacher.pipe.vae, z)
        seconds = time.perf_counter() - t0
        u8 = to_uint8(images)
        grid = u8[:max(0, grid_n - a)].permute(0, 2, 3, 1).numpy()
        store.write_batch(method, a, s.features(u8, p.prompts[a:b]), grid, seconds)
        made += b - a
        if on_batch is not None:
            on_batch(b - a)
    return made


def figure_png(config: EvaluateConfig, p: Prepared) -> bytes:
    """trajectory.png as bytes, drawn where the student is loaded (a worker, when sharded)."""
    s = worker_models(config, p, student=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trajectory.png"
        trajectory_figure(p.store, s.teacher, p.student, lambda z: decode_latents(s.teacher.pipe.vae, z),
                          config.trajectory_rows, out)
        return out.read_bytes()


def finish(config: EvaluateConfig, p: Prepared, figure: bytes, log: Callable[[str], None],
           t_start: float) -> EvalResult:
    """Measure every sampler from the complete store and write the eval dir."""
    store = EvalStore(config.feature_store)
    missing = [s.name for s in p.specs if not store.complete_mask(s.name).all()]
    if missing:
        raise RuntimeError(f"{config.feature_store}: samplers {missing} are incomplete after sampling")
    measures = [(m, m.from_store(config, store, log)) for m in feature_metrics()
                if m.name in store.schema.metrics]
    skipped = [m.name for m in registered_metrics() if m not in feature_metrics()]
    notes = [f"images/s: sampling and VAE decoding per device, batch {config.batch_size} (summed over the "
             f"store's batches); NFE counts both CFG branches",
             f"measured from per-image features in {config.feature_store} "
             f"({', '.join(m.name for m, _ in measures) or 'no feature metric: pass --fid-weights, --clip-model'}); "
             f"not measured at this scale: {', '.join(skipped)}"]
    rows = []
    for spec in p.specs:
        row = sampler_row(spec, config.num_images, store.seconds(spec.name))
        for _metric, measure in measures:
            row.update(measure(spec.name))
        if spec.uses_student:
            row["distill_seconds"] = distill_seconds(p.run)
        rows.append(row)
        log_row(row, log)
    grid = {spec.label: torch.from_numpy(store.grid(spec.name)).float() / 255 for spec in p.specs}
    device = str(resolve_device(config.device))
    return write_eval_dir(config, p, rows, notes, grid, lambda out: out.write_bytes(figure), device, log, t_start)


def evaluate_in_process(config: EvaluateConfig, p: Prepared, progress: Callable[[Progress], None] | None,
                        log: Callable[[str], None], t_start: float) -> EvalResult:
    """The whole feature-store evaluation in this process, sampler after sampler (student last)."""
    with store_lock(config.feature_store):
        store = open_feature_store(config, p)
        total, made, t0 = pending_images(config, p, store), 0, time.perf_counter()
        log(f"evaluating {config.run} into {config.feature_store}: {len(p.specs)} samplers × {config.num_images} "
            f"images, {total} still to sample")

        def on_batch(n: int) -> None:
            nonlocal made
            made += n
            if progress is not None:
                progress(Progress(made, total, made / max(time.perf_counter() - t0, 1e-9), "images"))

        for spec in p.specs:
            evaluate_range(config, p, spec.name, 0, config.num_images, on_batch)
        return finish(config, p, figure_png(config, p), log, t_start)
