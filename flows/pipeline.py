"""``rapm pipeline`` and ``rapm demo``: ingest → trajectories → distill → evaluate under one config.

The pipeline is a Prefect flow whose stages are the stage flows themselves, run as subflows, in
one work dir:

    WORK/prompts.txt        the built-in shapes captions (when no prompt file is given)
    WORK/prompts/           prompt store (train and eval splits)
    WORK/trajectories.zarr  teacher trajectories of the train split
    WORK/run/               distillation run dir (checkpoints, export/)
    WORK/run/eval/          metrics.json, figures, report.md

Before each stage the pipeline asks that stage whether its output is already complete for the
same config (the stages' own checks, which also refuse a store made with another config); a
complete stage is skipped without starting its subflow, an interrupted one resumes where it
stopped. So re-running the same command after a crash, or after it finished, is always safe.

``rapm demo`` is the pipeline on the embedded default (the committed shapes teacher and
evaluator, the built-in prompts) with sizes chosen to finish on a 2-core CPU in minutes; see
``DemoConfig`` for the values and why.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import evaluate as evaluate_stage
from flows.cli_model import add_model_arguments, model_from_args
from flows.distill import DistillRunConfig, already_done
from flows.evaluate import ASSETS, EvaluateConfig
from flows.trajectories import TrajectoriesConfig, preflight, select_prompts
from rapm_core.distill import DistillConfig
from rapm_core.embedded.shapes import all_prompts
from rapm_core.teacher import resolve_device
from storage.atomic import write_text_atomic
from storage.errors import StoreError
from storage.hashing import config_hash
from storage.prompt_sources import IngestConfig, plan_ingest
from storage.trajectory_store import TrajectoryStore

EMBEDDED_TEACHER = ASSETS / "shapes-teacher"
STAGES = ("ingest", "trajectories", "distill", "evaluate")


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


class PipelineConfig(BaseModel):
    """All four stages under one config; every option not given keeps its stage's default."""

    model_config = ConfigDict(extra="forbid")

    work: str = Field(description="work dir holding every stage's output (re-run to resume)")
    prompts: str | None = Field(None, description="prompt file (.txt/.csv/.jsonl/COCO .json); "
                                                  "default: the built-in shapes captions")
    teacher: str = Field(str(EMBEDDED_TEACHER), description="teacher pipeline: local diffusers dir or hub id")
    revision: str | None = Field(None, description="teacher revision (hub branch, tag or commit)")
    seed: int = Field(0, ge=0, description="seed of the split, the trajectories' noise, the data order and the eval noise")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device for every stage")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    # ingest
    eval_fraction: float = Field(_default(IngestConfig, "eval_fraction"), ge=0.0, lt=1.0,
                                 description="share of prompts held out for evaluation")
    prompt_limit: int | None = Field(None, ge=1, description="keep only the first N unique prompts of the file")
    # trajectories
    slots: int = Field(_default(TrajectoriesConfig, "slots"), ge=1, description="N: student sampling steps")
    steps_per_slot: int = Field(_default(TrajectoriesConfig, "steps_per_slot"), ge=1,
                                description="M: teacher DDIM steps per slot")
    guidance: float = Field(_default(TrajectoriesConfig, "guidance"), ge=1.0, description="teacher CFG scale")
    num_trajectories: int | None = Field(None, ge=1, description="train prompts to use; default: all")
    samples_per_prompt: int = Field(_default(TrajectoriesConfig, "samples_per_prompt"), ge=1,
                                    description="teacher trajectories per train prompt, each from its own noise")
    trajectory_batch_size: int = Field(_default(TrajectoriesConfig, "batch_size"), ge=1,
                                       description="prompts per teacher batch")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(_default(TrajectoriesConfig, "dtype"), description="teacher dtype")
    # distill
    iterations: int = Field(_default(DistillRunConfig, "iterations"), ge=1, description="distillation iterations")
    checkpoint_every: int = Field(_default(DistillRunConfig, "checkpoint_every"), ge=1,
                                  description="checkpoint interval (iterations)")
    method: DistillConfig = Field(default_factory=DistillConfig, description="RAPM hyperparameters")
    # evaluate
    num_images: int = Field(_default(EvaluateConfig, "num_images"), ge=2, description="eval images per method")
    eval_batch_size: int = Field(_default(EvaluateConfig, "batch_size"), ge=1, description="eval sampling batch")
    evaluator: str = Field(_default(EvaluateConfig, "evaluator"), description="shapes evaluator dir, auto or none")
    fid_weights: str | None = Field(None, description="torch-fidelity Inception weights (.pth) for Inception FID")
    clip_model: str | None = Field(None, description="local CLIPModel directory for CLIP score")


# Measured on a 2-core CPU (see the project README's demo section): the embedded teacher's
# 4-step DDIM is clearly worse than its 4×8-step reference there, and this many iterations on all
# train trajectories closes most of that gap in a few minutes.
DEMO_METHOD: dict[str, Any] = {}


class DemoConfig(PipelineConfig):
    """The pipeline on the embedded default, sized for a CPU: ``rapm demo``."""

    work: str = Field("runs/demo", description="work dir (re-run to resume)")
    steps_per_slot: int = Field(8, ge=1, description="M: teacher DDIM steps per slot")
    guidance: float = Field(4.0, ge=1.0, description="teacher CFG scale")
    trajectory_batch_size: int = Field(16, ge=1, description="prompts per teacher batch")
    # The embedded models' ops are tiny (8×8 latents, batch 1 in distillation): a second thread
    # buys little, and on a busy 2-core machine OpenMP's waiting made distillation 13× slower
    # (7.2 vs 0.55 s/iteration measured).
    threads: int | None = Field(1, ge=1, description="torch CPU threads")
    iterations: int = Field(300, ge=1, description="distillation iterations")
    checkpoint_every: int = Field(100, ge=1, description="checkpoint interval (iterations)")
    method: DistillConfig = Field(default_factory=lambda: DistillConfig(**DEMO_METHOD),
                                  description="RAPM hyperparameters")
    num_images: int = Field(200, ge=2, description="eval images per method")
    eval_batch_size: int = Field(50, ge=1, description="eval sampling batch")

    @model_validator(mode="before")
    @classmethod
    def _demo_method(cls, data: Any) -> Any:
        # Method options given on the command line refine the demo's values instead of
        # replacing them with DistillConfig's defaults.
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data = {**data, "method": {**DEMO_METHOD, **data["method"]}}
        return data


# -- the stage configs, derived -------------------------------------------------------------------
def paths(config: PipelineConfig) -> dict[str, Path]:
    work = Path(config.work)
    return {"source": Path(config.prompts) if config.prompts else work / "prompts.txt", "prompts": work / "prompts",
            "trajectories": work / "trajectories.zarr", "run": work / "run"}


def ingest_config(config: PipelineConfig) -> IngestConfig:
    p = paths(config)
    return IngestConfig(source=str(p["source"]), out=str(p["prompts"]), limit=config.prompt_limit,
                        eval_fraction=config.eval_fraction, seed=config.seed)


def trajectories_config(config: PipelineConfig) -> TrajectoriesConfig:
    p = paths(config)
    return TrajectoriesConfig(prompts=str(p["prompts"]), teacher=config.teacher, out=str(p["trajectories"]),
                              revision=config.revision, slots=config.slots, steps_per_slot=config.steps_per_slot,
                              guidance=config.guidance, seed=config.seed, batch_size=config.trajectory_batch_size,
                              dtype=config.dtype, device=config.device, split="train", limit=config.num_trajectories,
                              samples_per_prompt=config.samples_per_prompt)


def distill_config(config: PipelineConfig) -> DistillRunConfig:
    p = paths(config)
    return DistillRunConfig(trajectories=str(p["trajectories"]), out=str(p["run"]), iterations=config.iterations,
                            checkpoint_every=config.checkpoint_every, seed=config.seed, device=config.device,
                            method=config.method)


def evaluate_config(config: PipelineConfig) -> EvaluateConfig:
    p = paths(config)
    return EvaluateConfig(run=str(p["run"]), trajectories=str(p["trajectories"]), prompts=str(p["prompts"]),
                          num_images=config.num_images, seed=config.seed, batch_size=config.eval_batch_size,
                          device=config.device, evaluator=config.evaluator, fid_weights=config.fid_weights,
                          clip_model=config.clip_model)


def write_builtin_prompts(path: Path) -> None:
    """Every shapes caption, one a line; rewritten only if different, so the ingest stays complete."""
    text = "\n".join(all_prompts()) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


# -- completeness checks (cheap: no model loads) --------------------------------------------------
def trajectories_complete(config: TrajectoriesConfig) -> bool:
    preflight(config)  # refuses a store made with another config
    try:
        store = TrajectoryStore(config.out)
    except StoreError:
        return False
    return store.num == len(select_prompts(config)) and bool(store.complete_mask().all())


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float


_CHECKS: dict[str, tuple[Callable[[PipelineConfig], Any], Callable[[Any], bool]]] = {
    "ingest": (ingest_config, lambda c: plan_ingest(c).already_complete),
    "trajectories": (trajectories_config, trajectories_complete),
    "distill": (distill_config, lambda c: already_done(c) is not None),
    "evaluate": (evaluate_config, lambda c: evaluate_stage.finished(c) is not None),
}


def prepare(config: PipelineConfig) -> None:
    Path(config.work).mkdir(parents=True, exist_ok=True)
    if config.prompts is None:
        write_builtin_prompts(paths(config)["source"])


def all_complete(config: PipelineConfig) -> bool:
    """Whether every stage is done (each check needs the previous stage's output, so stop at the first gap)."""
    prepare(config)
    for stage in STAGES:
        make, complete = _CHECKS[stage]
        if not complete(make(config)):
            return False
    return True


def run_pipeline(config: PipelineConfig, stage_runners: dict[str, Callable[[Any], Any]],
                 log: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run each stage that is not complete through ``stage_runners[stage](stage_config)``."""
    prepare(config)
    outcomes = []
    for stage in STAGES:
        make, complete = _CHECKS[stage]
        stage_config = make(config)
        t0 = time.perf_counter()
        if complete(stage_config):
            log(f"{stage}: already complete with this config; skipped")
            outcomes.append(StageOutcome(stage, True, time.perf_counter() - t0))
            continue
        log(f"{stage}: running")
        stage_runners[stage](stage_config)
        outcomes.append(StageOutcome(stage, False, time.perf_counter() - t0))
        log(f"{stage}: done in {outcomes[-1].seconds:.1f} s")
    return outcomes


# -- Prefect wiring ------------------------------------------------------------------------------
def _pipeline_flow(config: PipelineConfig) -> dict:
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    from flows.distill import distill_flow
    from flows.ingest import ingest_flow
    from flows.trajectories import trajectories_flow

    logger = get_run_logger()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    runners = {"ingest": ingest_flow, "trajectories": trajectories_flow, "distill": distill_flow,
               "evaluate": evaluate_stage.evaluate_flow}
    outcomes = run_pipeline(config, runners, log=logger.info)
    eval_dir = paths(config)["run"] / evaluate_stage.EVAL_DIR
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.stage} | {'skipped (complete)' if o.skipped else 'ran'} | {o.seconds:.1f} |" for o in outcomes]
    create_markdown_artifact("\n".join(lines) + f"\n\nReport: `{eval_dir / 'report.md'}`\n",
                             key="rapm-pipeline", description=f"pipeline stages in {config.work}")
    return {"stages": [asdict(o) for o in outcomes], "eval_dir": str(eval_dir)}


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    config = PipelineConfig.model_validate(flow_run.parameters["config"])
    digest = config_hash(config.model_dump(mode="json", exclude={"work"}))[:8]
    return f"pipeline-{Path(config.teacher).name}-{Path(config.work).name}-{digest}"


def _make_flow():
    from prefect import flow

    return flow(name="pipeline", flow_run_name=_flow_run_name)(_pipeline_flow)


pipeline_flow = _make_flow()


# -- CLI -----------------------------------------------------------------------------------------
def _cli(model: type[PipelineConfig]) -> Callable:
    def run(args) -> int:
        config = model_from_args(model, args)
        resolve_device(config.device)
        t0 = time.perf_counter()
        eval_dir = paths(config)["run"] / evaluate_stage.EVAL_DIR
        if all_complete(config):
            # Nothing to do: no flow run, no Prefect start-up.
            stages = [{"stage": s, "skipped": True} for s in STAGES]
        else:
            # The ephemeral server's telemetry heartbeat races the flow's writes on a fresh SQLite
            # database and logs a traceback; it is of no use to a local run.
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            stages = pipeline_flow(config)["stages"]
        for stage in stages:
            status = "skipped (already complete)" if stage["skipped"] else f"ran in {stage['seconds']:.1f} s"
            print(f"{stage['stage']}: {status}")
        evaluate_stage.print_summary(str(eval_dir), evaluate_stage.finished(evaluate_config(config))["methods"])
        print(f"total wall time {time.perf_counter() - t0:.0f} s")
        return 0

    return run


def register(subparsers) -> None:
    for name, model, text in (("pipeline", PipelineConfig, "ingest → trajectories → distill → evaluate in one work dir"),
                              ("demo", DemoConfig, "the whole pipeline on the embedded shapes teacher, sized for a CPU")):
        parser = subparsers.add_parser(name, help=text, description=model.__doc__)
        add_model_arguments(parser, model)
        parser.set_defaults(func=_cli(model))
