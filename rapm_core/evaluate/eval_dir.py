"""What every evaluation path shares: the finished run it reads, the eval prompts, the eval dir it
writes whole (temp dir, rename) and publishes, and the rows of the report.

The eval dir names the config and the run step it measured, so a re-run with the same config on the
same finished run does nothing.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from rapm_core.errors import ConfigError
from rapm_core.evaluate import report
from rapm_core.evaluate.config import EVAL_DIR, EvaluateConfig
from rapm_core.evaluate.samplers import SamplerSpec, sampler_specs
from rapm_core.evaluate.student import StudentExport, load_student_export
from storage.atomic import check_writable
from storage.errors import ConfigMismatchError, StoreError
from storage.hashing import config_hash
from storage.prompt_store import PromptStore
from storage.run_dir import RunDir
from storage.trajectory_store import TrajectoryStore
from storage.urls import exists, join, publish_dir, read_text

# Speed and where the report goes, not results: excluded from the eval's identity.
HASH_EXCLUDED = frozenset({"run", "batch_size", "device", "publish", "feature_store", "execution"})


@dataclass(frozen=True)
class EvalResult:
    eval_dir: str
    rows: list[dict]
    skipped: bool
    seconds: float


def eval_config_hash(config: EvaluateConfig) -> str:
    return config_hash(config.model_dump(mode="json", exclude=set(HASH_EXCLUDED)))


def read_run(config: EvaluateConfig) -> tuple[RunDir, dict, dict]:
    """The finished run: its record, its ``done.json``, and an export that matches its manifest."""
    run = RunDir(config.run)
    if not run.run_json.is_file():
        raise StoreError(f"{config.run}: not a run dir (no run.json); run `rapm distill` first")
    record = run.record()
    done = run.done()
    if done is None:
        raise StoreError(f"{config.run}: distillation has not finished (no done.json); finish `rapm distill` first")
    if (problem := run.export_problem()) is not None:
        raise StoreError(f"{run.export_dir}: {problem}; run `rapm distill` with the run's options to rebuild "
                         f"the export from the last checkpoint")
    return run, record, done


@contextmanager
def writing_eval_dir(config: EvaluateConfig) -> Iterator[None]:
    """Hold the run dir's one-writer lock (the one distillation takes) while an evaluation writes its
    eval dir, after checking that the run dir can be written at all, so that a second evaluation, or
    one on a read-only run dir, is refused before anything is sampled. An evaluation that is already
    finished writes nothing and takes nothing."""
    if finished(config) is not None:
        yield
        return
    run = RunDir(config.run)
    with run.lock():
        check_writable(run.path)
        yield


def distilled_from_store(config: EvaluateConfig, record: dict) -> TrajectoryStore:
    """The store the run was distilled from: ``--trajectories``, else the one run.json names."""
    path = config.trajectories or record.get("trajectory_store")
    if path is None:
        raise ConfigError(f"{config.run}/run.json does not name its trajectory store (an older run dir); "
                          f"pass --trajectories")
    store = TrajectoryStore(path)
    if store.schema.config_hash != record["store_config_hash"]:
        raise ConfigMismatchError(f"{path}: not the trajectory store {config.run} was distilled from (config hash "
                                  f"{store.schema.config_hash[:12]} vs {record['store_config_hash'][:12]})")
    return store


def eval_identity(config: EvaluateConfig, record: dict, done: dict) -> dict:
    """What a finished eval dir measured: this config on this run at this step."""
    return {"eval_config_hash": eval_config_hash(config), "run_config_hash": record["config_hash"],
            "run_step": done["step"]}


def finished(config: EvaluateConfig) -> dict | None:
    """The existing metrics.json if it measured exactly this config on this run's current student."""
    run, record, done = read_run(config)
    path = run.path / EVAL_DIR / "metrics.json"
    if not path.is_file():
        return None
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # a damaged report is measured again and replaced whole
        return None
    wanted = eval_identity(config, record, done)
    return existing if all(existing.get(k) == v for k, v in wanted.items()) else None


def eval_prompts(config: EvaluateConfig, store: TrajectoryStore) -> tuple[str, list[str]]:
    source = config.prompts or (store.schema.prompt_store.path if store.schema.prompt_store else None)
    if source is None:
        raise ConfigError(f"{store.path} does not name its prompt store; pass --prompts")
    texts = [r.text for r in PromptStore(source).records("eval")]
    if not texts:
        raise StoreError(f"{source}: the eval split is empty; re-ingest with --eval-fraction > 0 or pass --prompts")
    return source, texts


@dataclass
class Prepared:
    """What an evaluation reads before any model loads: the finished run, its trajectory store,
    the prompt of every image and the samplers' specs."""

    run: RunDir
    record: dict
    done: dict
    store: TrajectoryStore
    prompt_source: str
    texts: list[str]
    prompts: list[str]
    student: StudentExport
    specs: list[SamplerSpec]


def prepare(config: EvaluateConfig) -> Prepared:
    run, record, done = read_run(config)
    store = distilled_from_store(config, record)
    schema = store.schema
    prompt_source, texts = eval_prompts(config, store)
    prompts = [texts[i % len(texts)] for i in range(config.num_images)]
    student = load_student_export(run.export_dir)
    specs = sampler_specs(schema.scheduler_config, schema.num_slots, schema.steps_per_slot, schema.guidance, student)
    return Prepared(run, record, done, store, prompt_source, texts, prompts, student,
                    [specs[m] for m in config.samplers])


def already_evaluated(config: EvaluateConfig, log: Callable[[str], None], t_start: float) -> EvalResult | None:
    """The finished eval dir of exactly this config (published again if asked), or None."""
    existing = finished(config)
    if existing is None:
        return None
    log(f"{config.run}/{EVAL_DIR}: already evaluated with this config at step {existing['run_step']}; nothing to do")
    publish_report(config, Path(config.run) / EVAL_DIR, log)
    return EvalResult(str(Path(config.run) / EVAL_DIR), existing["samplers"], True, time.perf_counter() - t_start)


def write_eval_dir(config: EvaluateConfig, p: Prepared, rows: list[dict], notes: list[str],
                   grid: dict[str, torch.Tensor], figure: Callable[[Path], None], device: str,
                   log: Callable[[str], None], t_start: float) -> EvalResult:
    """The eval dir, whole (temp dir, rename): the figures, report.md and metrics.json last."""
    schema = p.store.schema
    with p.run.replacing(EVAL_DIR) as tmp:
        figure(tmp / "trajectory.png")
        report.image_grid(grid, p.prompts[:min(config.grid_rows, config.num_images)], tmp / "grid.png")
        report.metrics_bar_chart(rows, tmp / "metrics.png")
        facts = [("run", str(p.run.path)), ("teacher", schema.teacher),
                 ("N slots × M steps, teacher guidance", f"{schema.num_slots} × {schema.steps_per_slot}, "
                                                         f"{schema.guidance:g}"),
                 ("distillation iterations", str(p.done["step"])),
                 ("eval prompts", f"{len(p.texts)} from {p.prompt_source}"),
                 ("images per sampler", str(config.num_images)), ("device", device)]
        if config.feature_store:
            facts.append(("feature store", config.feature_store))
        (tmp / "report.md").write_text(report.report_markdown(f"Evaluation: {p.run.path.name}", rows, facts, notes),
                                       encoding="utf-8")
        payload = {**eval_identity(config, p.record, p.done), "config": config.model_dump(mode="json"),
                   "samplers": rows, "notes": notes, "prompts": p.prompts, "teacher": schema.teacher,
                   "device": device}
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    out = p.run.path / EVAL_DIR
    log(f"wrote {out}/report.md")
    publish_report(config, out, log)
    return EvalResult(str(out), rows, False, time.perf_counter() - t_start)


def sampler_row(spec: SamplerSpec, images: int, seconds: float) -> dict:
    """A sampler's facts, before its metrics."""
    return {"sampler": spec.name, "label": spec.label, "steps": spec.num_steps, "guidance": spec.guidance,
            "nfe": spec.nfe, "images_per_second": images / seconds if seconds > 0 else float("inf"),
            "seconds": seconds}


def distill_seconds(run: RunDir) -> float:
    return float(sum(r.get("seconds", 0.0) for r in run.metrics.read()))


def log_row(row: dict, log: Callable[[str], None]) -> None:
    log(" · ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                   if k not in ("label", "seconds")))


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

