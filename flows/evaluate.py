"""Stage C flow: run dir → RUN_DIR/eval/ (``rapm evaluate``), the quality benchmark of one run.

Every method samples the same eval prompts from the same per-image noise; the metrics compare
them with the teacher's N·M-step reference, with real renders (the embedded shapes domain) or
with Inception/CLIP (real teachers, weights supplied by the user). ``evaluate_run`` is the plain
function the flow and the pipeline call. The eval dir is written whole (temp dir, rename) and
names the config and the run step it measured, so a re-run with the same config on the same
finished run does nothing.
"""

from __future__ import annotations

import json
import time
from functools import reduce
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows import report
from flows.cli_model import add_model_arguments, model_from_args
from rapm_core import evaluation, metrics
from rapm_core.conditioning import Conditioning
from rapm_core.embedded.evaluator import load_evaluator
from rapm_core.embedded.shapes import parse_caption
from rapm_core.errors import ConfigError
from rapm_core.evaluation import METHODS, REFERENCE, MethodSamples
from rapm_core.sampler import ddim_sample
from rapm_core.schedule import SlotGrid
from rapm_core.teacher import decode_latents, encode_prompts, encode_uncond, load_teacher, resolve_device, resolve_dtype
from rapm_core.trajectory import initial_noise
from storage.errors import ConfigMismatchError, StoreError
from storage.hashing import config_hash
from storage.prompt_store import PromptStore
from storage.run_dir import RunDir
from storage.teacher_fingerprint import check_teacher_unchanged
from storage.trajectory_store import TrajectoryStore
from storage.urls import exists, join, publish_dir, read_text

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_EVALUATOR = ASSETS / "shapes-evaluator"
EVAL_DIR = "eval"
# Speed, not results: excluded from the eval's identity.
HASH_EXCLUDED = frozenset({"run", "batch_size", "device", "publish"})
Method = Literal["teacher_ref", "teacher_ddim", "dpm_solver", "student"]


class EvaluateConfig(BaseModel):
    """Stage C: sample the eval prompts with every method from the same noise and measure them."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(description="run dir made by `rapm distill` (its export/ is the student)")
    trajectories: str | None = Field(None, description="trajectory store the run was distilled from "
                                                       "(default: the one run.json names)")
    prompts: str | None = Field(None, description="prompt store whose eval split is sampled "
                                                  "(default: the one the trajectory store was made from)")
    num_images: int = Field(64, ge=2, description="images per method; the eval prompts repeat with fresh noise if fewer")
    methods: list[Method] = Field(list(METHODS), description=f"methods to run ({', '.join(METHODS)}); "
                                                             f"{REFERENCE} is always run: it is the fidelity reference")
    seed: int = Field(0, ge=0, description="noise seed: image i gets sha256(seed, i), the same for every method")
    batch_size: int = Field(16, ge=1, description="images per sampling batch (speed only)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device")
    evaluator: str = Field("auto", description="shapes evaluator dir for domain FID and prompt adherence; "
                                               "auto: the embedded one when every prompt is a shapes caption; none: off")
    render_seed: int = Field(0, description="seed of the real renders domain FID compares with")
    fid_weights: str | None = Field(None, description="torch-fidelity Inception weights (.pth) for Inception FID")
    fid_reference: str | None = Field(None, description="folder of real images for Inception FID "
                                                        f"(default: the {REFERENCE} images)")
    clip_model: str | None = Field(None, description="local CLIPModel directory for CLIP score")
    grid_rows: int = Field(6, ge=1, description="prompts shown in grid.png")
    trajectory_rows: int = Field(3, ge=1, description="stored trajectories shown in trajectory.png")
    publish: str | None = Field(None, description="also copy the finished eval dir here, e.g. s3://bucket/reports/run1 "
                                                  "(endpoint and keys from the environment)")

    @field_validator("methods")
    @classmethod
    def _reference_first(cls, methods: list[str]) -> list[str]:
        return [REFERENCE] + [m for m in METHODS if m in methods and m != REFERENCE]


@dataclass(frozen=True)
class EvalResult:
    eval_dir: str
    rows: list[dict]
    skipped: bool
    seconds: float


def eval_config_hash(config: EvaluateConfig) -> str:
    return config_hash(config.model_dump(mode="json", exclude=set(HASH_EXCLUDED)))


def _read_run(config: EvaluateConfig) -> tuple[RunDir, dict, dict]:
    run = RunDir(config.run)
    if not run.run_json.is_file():
        raise StoreError(f"{config.run}: not a run dir (no run.json); run `rapm distill` first")
    record = json.loads(run.run_json.read_text(encoding="utf-8"))
    done = run.done()
    if done is None:
        raise StoreError(f"{config.run}: distillation has not finished (no done.json); finish `rapm distill` first")
    return run, record, done


def _open_store(config: EvaluateConfig, record: dict) -> TrajectoryStore:
    path = config.trajectories or record.get("trajectory_store")
    if path is None:
        raise ConfigError(f"{config.run}/run.json does not name its trajectory store; pass --trajectories")
    store = TrajectoryStore(path)
    if store.attrs["config_hash"] != record["store_config_hash"]:
        raise ConfigMismatchError(f"{path}: not the trajectory store {config.run} was distilled from "
                                  f"(config hash {store.attrs['config_hash'][:12]} vs {record['store_config_hash'][:12]})")
    return store


def eval_identity(config: EvaluateConfig, record: dict, done: dict) -> dict:
    """What a finished eval dir measured: this config on this run at this step."""
    return {"eval_config_hash": eval_config_hash(config), "run_config_hash": record["config_hash"],
            "run_step": done["step"]}


def finished(config: EvaluateConfig) -> dict | None:
    """The existing metrics.json if it measured exactly this config on this run's current student."""
    run, record, done = _read_run(config)
    path = run.path / EVAL_DIR / "metrics.json"
    if not path.is_file():
        return None
    existing = json.loads(path.read_text(encoding="utf-8"))
    wanted = eval_identity(config, record, done)
    return existing if all(existing.get(k) == v for k, v in wanted.items()) else None


def eval_prompts(config: EvaluateConfig, store: TrajectoryStore) -> tuple[str, list[str]]:
    source = config.prompts or (store.attrs.get("prompt_store") or {}).get("path")
    if source is None:
        raise ConfigError(f"{store.path} does not name its prompt store; pass --prompts")
    texts = [r.text for r in PromptStore(source).records("eval")]
    if not texts:
        raise StoreError(f"{source}: the eval split is empty; re-ingest with --eval-fraction > 0 or pass --prompts")
    return source, texts


def _resolve_evaluator(config: EvaluateConfig, prompts: list[str]) -> Path | None:
    if config.evaluator == "none":
        return None
    if config.evaluator != "auto":
        return Path(config.evaluator)
    try:
        for p in prompts:
            parse_caption(p)
    except ConfigError:
        return None
    return EMBEDDED_EVALUATOR if (EMBEDDED_EVALUATOR / "config.json").is_file() else None


def _load_reference_images(folder: str, size: tuple[int, int]) -> torch.Tensor:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ConfigError(f"{folder}: need at least 2 real images (png/jpg/webp) for Inception FID")
    arrays = [np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _distill_seconds(run: RunDir) -> float:
    return float(sum(r.get("seconds", 0.0) for r in run.metrics.read()))


def _save_png(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(metrics.to_uint8(images).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def evaluate_run(config: EvaluateConfig, progress: Callable[[float], None] | None = None,
                 log: Callable[[str], None] = print) -> EvalResult:
    """Sample, measure and write RUN_DIR/eval/ (metrics.json, grid.png, metrics.png, trajectory.png, report.md)."""
    t_start = time.perf_counter()
    existing = finished(config)
    if existing is not None:
        log(f"{config.run}/{EVAL_DIR}: already evaluated with this config at step {existing['run_step']}; nothing to do")
        publish_report(config, Path(config.run) / EVAL_DIR, log)
        return EvalResult(str(Path(config.run) / EVAL_DIR), existing["methods"], True, time.perf_counter() - t_start)
    run, record, done = _read_run(config)
    store = _open_store(config, record)
    attrs = store.attrs
    prompt_source, texts = eval_prompts(config, store)
    prompts = [texts[i % len(texts)] for i in range(config.num_images)]
    evaluator_dir = _resolve_evaluator(config, texts)
    student_scheduler, student_steps = evaluation.load_student_settings(run.export_dir)
    specs = evaluation.method_specs(attrs["num_slots"], attrs["steps_per_slot"], attrs["guidance"], student_steps)
    specs = [specs[m] for m in config.methods]

    device = resolve_device(config.device)
    dtype = resolve_dtype(attrs["compute_dtype"])
    log(f"evaluating {config.run}: {len(specs)} methods × {config.num_images} images "
        f"({len(texts)} eval prompts from {prompt_source}) on {device}")
    check_teacher_unchanged(attrs, store.path)
    teacher = load_teacher(attrs["teacher"], attrs.get("teacher_revision"), dtype, device)
    cond = reduce(Conditioning.cat, [encode_prompts(teacher, prompts[a:a + config.batch_size])
                                     for a in range(0, len(prompts), config.batch_size)])
    uncond = encode_uncond(teacher)
    noise = initial_noise([evaluation.eval_seed(config.seed, i) for i in range(config.num_images)],
                          teacher.latent_shape, dtype, device)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return decode_latents(teacher.pipe.vae, z)

    total = len(specs) * config.num_images
    done_images = 0

    def on_batch(n: int) -> None:
        nonlocal done_images
        done_images += n
        if progress is not None:
            progress(100.0 * done_images / total)

    samples: dict[str, MethodSamples] = {}
    teacher_specs = [s for s in specs if not s.uses_student]
    for spec in teacher_specs:
        samples[spec.name] = evaluation.run_method(spec, teacher.unet, teacher.scheduler_config, decode, noise, cond,
                                                   uncond, config.batch_size, on_batch)
        log(f"{spec.label}: {samples[spec.name].images_per_second:.2f} images/s")
    # From here on the UNet is the student, loaded the stock way a user of the export loads it and
    # fused as it would be deployed, so its speed is that of the bare UNet.
    teacher.pipe.load_lora_weights(str(run.export_dir))
    teacher.pipe.fuse_lora()
    for spec in specs[len(teacher_specs):]:
        samples[spec.name] = evaluation.run_method(spec, teacher.unet, student_scheduler, decode, noise, cond,
                                                   uncond, config.batch_size, on_batch)
        log(f"{spec.label}: {samples[spec.name].images_per_second:.2f} images/s")

    rows, notes = _measure(config, samples, prompts, evaluator_dir, run, log)
    with run.replacing(EVAL_DIR) as tmp:
        _trajectory_figure(config, store, teacher, student_scheduler, student_steps, decode, tmp / "trajectory.png")
        grid_n = min(config.grid_rows, config.num_images)
        report.image_grid({samples[s.name].spec.label: samples[s.name].images[:grid_n] for s in specs},
                          prompts[:grid_n], tmp / "grid.png")
        report.metrics_bar_chart(rows, tmp / "metrics.png")
        facts = [("run", str(run.path)), ("teacher", attrs["teacher"]),
                 ("N slots × M steps, teacher guidance", f"{attrs['num_slots']} × {attrs['steps_per_slot']}, "
                                                         f"{attrs['guidance']:g}"),
                 ("distillation iterations", str(done["step"])), ("eval prompts", f"{len(texts)} from {prompt_source}"),
                 ("images per method", str(config.num_images)), ("device", str(device))]
        (tmp / "report.md").write_text(report.report_markdown(f"RAPM evaluation: {run.path.name}", rows, facts, notes),
                                       encoding="utf-8")
        payload = {**eval_identity(config, record, done), "config": config.model_dump(mode="json"),
                   "methods": rows, "notes": notes, "prompts": prompts, "teacher": attrs["teacher"],
                   "device": str(device)}
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    out = run.path / EVAL_DIR
    log(f"wrote {out}/report.md")
    publish_report(config, out, log)
    return EvalResult(str(out), rows, False, time.perf_counter() - t_start)


def publish_report(config: EvaluateConfig, eval_dir: Path, log: Callable[[str], None]) -> None:
    """Copy the eval dir to ``config.publish``, metrics.json and report.md last (see storage.urls).

    The eval dir itself stays in the run dir, which needs a local filesystem; an identical
    metrics.json already at the target means this report was published before.
    """
    if config.publish is None:
        return
    target = join(config.publish, "metrics.json")
    if exists(target) and read_text(target) == (eval_dir / "metrics.json").read_text(encoding="utf-8"):
        log(f"{config.publish}: this report is already published")
        return
    publish_dir(eval_dir, config.publish, last=("metrics.json", "report.md"))
    log(f"published {eval_dir} to {config.publish}")


def _measure(config: EvaluateConfig, samples: dict[str, MethodSamples], prompts: list[str],
             evaluator_dir: Path | None, run: RunDir, log: Callable[[str], None]) -> tuple[list[dict], list[str]]:
    notes: list[str] = [f"images/s: sampling and VAE decoding, batch {config.batch_size}; NFE counts both CFG branches"]
    reference = samples[REFERENCE]
    judge = real_features = None
    if evaluator_dir is not None:
        judge = load_evaluator(evaluator_dir)
        real_features = evaluation.real_render_features(judge, prompts, config.render_seed)
        notes.append(f"domain FID: evaluator features of each method's images vs real renders of the same prompts "
                     f"({evaluator_dir.name}); prompt adherence: share with every attribute right")
    inception_ref = None
    if config.fid_weights is not None:
        size = tuple(reference.images.shape[1:3])
        inception_ref = (_load_reference_images(config.fid_reference, size) if config.fid_reference
                         else metrics.to_uint8(reference.images))
        notes.append(f"Inception FID vs {'real images in ' + config.fid_reference if config.fid_reference else REFERENCE}")
    if evaluator_dir is None and config.fid_weights is None and config.clip_model is None:
        notes.append("no distribution metrics: pass --fid-weights and --clip-model (local weights) for a real teacher")
    rows = []
    for name, s in samples.items():
        row = {"method": name, "label": s.spec.label, "steps": s.spec.num_steps, "guidance": s.spec.guidance,
               "nfe": s.spec.nfe, "images_per_second": s.images_per_second, "seconds": s.seconds}
        row.update(evaluation.fidelity(s, reference) if name != REFERENCE else {"latent_mse": None, "psnr": None})
        if judge is not None:
            row.update(evaluation.domain_metrics(judge, s.images, prompts, real_features))
        if inception_ref is not None:
            row["inception_fid"] = metrics.frechet_inception_distance(inception_ref, metrics.to_uint8(s.images),
                                                                      config.fid_weights)
        if config.clip_model is not None:
            row["clip_score"] = metrics.clip_score(metrics.to_uint8(s.images), prompts, config.clip_model)
        if s.spec.uses_student:
            row["distill_seconds"] = _distill_seconds(run)
        rows.append(row)
        log(" · ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if k not in ("label", "seconds")))
    return rows, notes


def _trajectory_figure(config: EvaluateConfig, store: TrajectoryStore, teacher, student_scheduler: dict,
                       student_steps: int, decode: Callable[[torch.Tensor], torch.Tensor], out: Path) -> None:
    """Stored teacher positions at the slot boundaries vs the student's own N-step chain from the
    same stored noise and embeddings (the unet carries the loaded LoRA by now)."""
    attrs = store.attrs
    indices = store.complete_indices()[: config.trajectory_rows]
    recs = [store.read(int(i)) for i in indices]
    device, dtype = teacher.device, teacher.dtype

    def stacked(name: str) -> torch.Tensor | None:
        if recs[0][name] is None:
            return None
        return torch.from_numpy(np.stack([np.asarray(r[name], dtype=np.float32) for r in recs])).to(device, dtype)

    positions = stacked("positions")
    cond = Conditioning(stacked("prompt_embeds"), stacked("pooled_prompt_embeds"), stacked("time_ids"))
    teacher_pos = evaluation.slot_boundaries(positions, attrs["steps_per_slot"])
    student_pos = ddim_sample(teacher.unet, student_scheduler, positions[:, 0], cond, student_steps,
                              return_positions=True)
    k = teacher_pos.shape[1]
    if student_pos.shape[1] != k:
        raise ConfigError(f"the student samples {student_steps} steps but the store has {k - 1} slots")

    def decoded(pos: torch.Tensor) -> torch.Tensor:
        flat = decode(pos.flatten(0, 1))
        return flat.reshape(pos.shape[0], k, *flat.shape[1:])

    grid = SlotGrid.from_scheduler(attrs["scheduler_config"], attrs["num_slots"], attrs["steps_per_slot"])
    times = [grid.slot_start(grid.num_slots - 1)] + [grid.slot_end(n) for n in reversed(range(grid.num_slots))]
    report.trajectory_figure(decoded(teacher_pos), decoded(student_pos), [r["prompt"] for r in recs], times, out)


# -- Prefect wiring ------------------------------------------------------------------------------
def run_name(config: EvaluateConfig) -> str:
    return f"evaluate-{Path(config.run).name}-{eval_config_hash(config)[:8]}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    return run_name(config if isinstance(config, EvaluateConfig) else EvaluateConfig.model_validate(config))


def _evaluate_flow(config: EvaluateConfig) -> dict:
    from prefect import get_run_logger
    from prefect.artifacts import (
        create_markdown_artifact,
        create_progress_artifact,
        create_table_artifact,
        update_progress_artifact,
    )

    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"evaluate {config.run}: images sampled")
    result = evaluate_run(config, progress=lambda pct: update_progress_artifact(artifact, pct), log=logger.info)
    update_progress_artifact(artifact, 100.0)
    key = f"rapm-eval-{eval_config_hash(config)[:12]}"
    create_table_artifact(report.table_artifact_rows(result.rows), key=key, description=f"metrics of {config.run}")
    report_md = Path(result.eval_dir) / "report.md"
    create_markdown_artifact(report.inline_images(report_md.read_text(encoding="utf-8"), report_md.parent),
                             key=f"{key}-report",
                             description=f"evaluation report ({report_md})")
    return {"eval_dir": result.eval_dir, "rows": result.rows, "skipped": result.skipped}


def _make_flow():
    from prefect import flow

    return flow(name="evaluate", flow_run_name=_flow_run_name)(_evaluate_flow)


evaluate_flow = _make_flow()


# -- CLI -----------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Stage C: benchmark a distilled run against the teacher",
                                   description=EvaluateConfig.__doc__)
    add_model_arguments(parser, EvaluateConfig)
    parser.set_defaults(func=_cli)


def print_summary(eval_dir: str, rows: list[dict]) -> None:
    print(report.metrics_table_markdown(rows))
    print(f"report: {Path(eval_dir) / 'report.md'}")


def _cli(args) -> int:
    config = model_from_args(EvaluateConfig, args)
    existing = finished(config)
    if existing is not None:
        print(f"{config.run}/{EVAL_DIR}: already evaluated with this config; nothing to do")
        publish_report(config, Path(config.run) / EVAL_DIR, print)
        print_summary(str(Path(config.run) / EVAL_DIR), existing["methods"])
        return 0
    resolve_device(config.device)
    result = evaluate_flow(config)
    print_summary(result["eval_dir"], result["rows"])
    return 0
