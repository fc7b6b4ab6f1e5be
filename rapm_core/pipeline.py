"""All four stages in one work dir, under one config composed of the stage configs.

``PipelineConfig`` holds what the stages share (work dir, prompt file, teacher, seed, device) and
one section per stage with that stage's own options (``IngestOptions``, ``TrajectoriesOptions``,
``DistillOptions``, ``EvaluateOptions``), so every stage option is reachable from the pipeline's
CLI, its Prefect parameter form and ``prefect.yaml``, under the same name as in the stage's own
config. The stage configs are derived from it (paths under ``work``), never re-declared.

``run_pipeline`` runs each stage whose output is not already complete for the same config (the
stages' own checks, which also refuse a store made with another config); a complete stage is
skipped without starting it, an interrupted one resumes where it stopped. So re-running the
same command after a crash, or after it finished, is always safe. ``preflight`` refuses, before
the first stage runs, what a later stage would refuse (an empty split, a teacher that cannot
load, an option that does not fit the trajectories, an FID or CLIP file that is not there), so
no stage's work is spent on a pipeline that cannot finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from rapm_core.config import Device, StrictModel
from rapm_core.distill.config import DistillOptions, DistillRunConfig
from rapm_core.errors import ConfigError
from rapm_core.evaluate.config import EVAL_DIR, EvaluateConfig, EvaluateOptions
from rapm_core.ingest.config import IngestConfig, IngestOptions
from rapm_core.trajectories.config import TrajectoriesConfig, TrajectoriesOptions

STAGES = ("ingest", "trajectories", "distill", "evaluate")
# A nested section's options carry its stage's name on the command line (``--distill-lr``).
_SECTION = {stage: {"cli_prefix": f"{stage}-"} for stage in STAGES}


class PipelineConfig(StrictModel):
    """All four stages under one config; every option not given keeps its stage's default."""

    work: str = Field(description="work dir holding every stage's output (re-run to resume)")
    teacher: str = Field(description="teacher pipeline: local diffusers dir or hub id")
    prompts: str | None = Field(None, description="prompt file (.txt/.csv/.jsonl/COCO .json); "
                                                  "default: the built-in shapes captions, written to WORK/prompts.txt")
    revision: str | None = Field(None, description="teacher revision (hub branch, tag or commit)")
    seed: int = Field(0, ge=0, description="seed of the split, the trajectories' noise, the data order and the eval noise")
    device: Device = Field("auto", description="compute device for every stage")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    ingest: IngestOptions = Field(default_factory=IngestOptions, json_schema_extra=_SECTION["ingest"],
                                  description="prompt ingestion")
    trajectories: TrajectoriesOptions = Field(default_factory=TrajectoriesOptions,
                                              json_schema_extra=_SECTION["trajectories"],
                                              description="teacher trajectories (train split)")
    distill: DistillOptions = Field(default_factory=DistillOptions, json_schema_extra=_SECTION["distill"],
                                    description="distillation")
    evaluate: EvaluateOptions = Field(default_factory=EvaluateOptions, json_schema_extra=_SECTION["evaluate"],
                                      description="evaluation (eval split)")

    def paths(self) -> dict[str, Path]:
        work = Path(self.work)
        return {"source": Path(self.prompts) if self.prompts else work / "prompts.txt", "prompts": work / "prompts",
                "trajectories": work / "trajectories.zarr", "run": work / "run", "eval": work / "run" / EVAL_DIR}

    # -- the stage configs, derived -----------------------------------------------------------
    def ingest_config(self) -> IngestConfig:
        p = self.paths()
        return IngestConfig(source=str(p["source"]), out=str(p["prompts"]), seed=self.seed, **dict(self.ingest))

    def trajectories_config(self) -> TrajectoriesConfig:
        p = self.paths()
        return TrajectoriesConfig(prompts=str(p["prompts"]), teacher=self.teacher, out=str(p["trajectories"]),
                                  revision=self.revision, seed=self.seed, device=self.device, split="train",
                                  **dict(self.trajectories))

    def distill_config(self) -> DistillRunConfig:
        p = self.paths()
        return DistillRunConfig(trajectories=str(p["trajectories"]), out=str(p["run"]), seed=self.seed,
                                device=self.device, **dict(self.distill))

    def evaluate_config(self) -> EvaluateConfig:
        p = self.paths()
        return EvaluateConfig(run=str(p["run"]), trajectories=str(p["trajectories"]), prompts=str(p["prompts"]),
                              seed=self.seed, device=self.device, **dict(self.evaluate))

    def stage_config(self, stage: str):
        return getattr(self, f"{stage}_config")()


# -- completeness checks (cheap: no model loads) --------------------------------------------------
# The stage engines are imported by the checks, not with this module: PipelineConfig (and the
# CLI's options built from it) must import without torch.
def trajectories_complete(config: TrajectoriesConfig) -> bool:
    from rapm_core.trajectories.generate import preflight, select_prompts
    from storage.errors import StoreError
    from storage.trajectory_store import TrajectoryStore

    preflight(config)  # refuses a store made with another config
    try:
        store = TrajectoryStore(config.out)
    except StoreError:
        return False
    return store.num == len(select_prompts(config)) and bool(store.complete_mask().all())


def ingest_complete(config: IngestConfig) -> bool:
    from rapm_core.ingest.engine import plan_ingest

    return plan_ingest(config).already_complete


def distill_complete(config: DistillRunConfig) -> bool:
    from rapm_core.distill.run import already_done

    return already_done(config) is not None


def evaluate_complete(config: EvaluateConfig) -> bool:
    from rapm_core.evaluate.eval_dir import finished

    return finished(config) is not None


COMPLETE: dict[str, Callable[[Any], bool]] = {
    "ingest": ingest_complete,
    "trajectories": trajectories_complete,
    "distill": distill_complete,
    "evaluate": evaluate_complete,
}


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float


def preflight(config: PipelineConfig) -> None:
    """Refuse now what a later stage would refuse after the earlier ones ran (no model loads)."""
    from rapm_core.evaluate.features import check_reference_source
    from rapm_core.evaluate.measures import clip_model_dir, weights_file
    from rapm_core.ingest.engine import plan_ingest
    from rapm_core.teacher import detect_kind, resolve_device, teacher_identifier
    from rapm_core.trajectories.generate import preflight as trajectories_preflight

    ingest = config.ingest_config()
    counts = plan_ingest(ingest).counts
    fraction = f"--ingest-eval-fraction {config.ingest.eval_fraction:g}"
    if counts.eval == 0:
        raise ConfigError(f"{ingest.source}: {counts.kept} prompt(s) at {fraction} leave the eval split empty, and "
                          f"the evaluate stage samples it; raise {fraction.split()[0]} or give at least 2 prompts")
    if counts.train == 0:
        raise ConfigError(f"{ingest.source}: {counts.kept} prompt(s) at {fraction} leave no train prompts for the "
                          f"trajectories; give more prompts or lower {fraction.split()[0]}")
    resolve_device(config.device)
    trajectories = config.trajectories_config()
    if plan_ingest(ingest).already_complete:
        trajectories_preflight(trajectories)  # the store's split, an existing store, the teacher
    else:
        detect_kind(teacher_identifier(config.teacher), config.revision)
    offset, steps = config.distill.rapm.relative_offset, config.trajectories.steps_per_slot
    if config.distill.method == "rapm" and not 0 <= offset < steps:
        raise ConfigError(f"--distill-relative-offset {offset} must be below --trajectories-steps-per-slot {steps}")
    evaluate = config.evaluate
    if evaluate.fid_weights is not None:
        weights_file(evaluate.fid_weights)
    if evaluate.fid_reference is not None:
        check_reference_source(evaluate.fid_reference)
    if evaluate.clip_model is not None:
        clip_model_dir(evaluate.clip_model)


def all_complete(config: PipelineConfig) -> bool:
    """Whether every stage is done (each check needs the previous stage's output, so stop at the first gap)."""
    return all(COMPLETE[stage](config.stage_config(stage)) for stage in STAGES)


def run_pipeline(config: PipelineConfig, stage_runners: dict[str, Callable[[Any], Any]],
                 log: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run each stage that is not complete through ``stage_runners[stage](stage_config)``."""
    preflight(config)
    outcomes = []
    for stage in STAGES:
        stage_config = config.stage_config(stage)
        t0 = time.perf_counter()
        if COMPLETE[stage](stage_config):
            log(f"{stage}: already complete with this config; skipped")
            outcomes.append(StageOutcome(stage, True, time.perf_counter() - t0))
            continue
        log(f"{stage}: running")
        stage_runners[stage](stage_config)
        outcomes.append(StageOutcome(stage, False, time.perf_counter() - t0))
        log(f"{stage}: done in {outcomes[-1].seconds:.1f} s")
    return outcomes
