"""Stage B flow: trajectory store → run dir (``rapm distill``).

``run_distillation`` is the plain training loop the flow calls (a pipeline flow reuses it):
one loop, written to be read top to bottom next to the paper, EDM-style. Each iteration takes
the next trajectory of a seeded per-epoch permutation (the next one is read from Zarr on a
background thread meanwhile), makes one ``Distiller.train_step`` with the run's own
``torch.Generator``, and appends one line to ``metrics.jsonl``.

Resume is exact: a checkpoint holds the weights, both optimizers, every RNG state (python,
numpy, torch, CUDA, the training generator), the data cursor and the metrics line count, so a
run killed at any moment and restarted ends bit-identical to one never stopped (on the same
device). A run dir belongs to one config hash and one trajectory store; the fields in
``HASH_EXCLUDED`` don't change what is computed per iteration, so a finished run can be
extended (more ``--iterations``), moved to another device or checkpointed differently.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from flows.cli_model import add_model_arguments, model_from_args
from flows.plots import plot_loss_curves
from rapm_core.conditioning import Conditioning
from rapm_core.distill import DistillConfig, Distiller, Example, NonFiniteLossError
from rapm_core.errors import ConfigError
from rapm_core.schedule import SlotGrid
from rapm_core.teacher import load_unet, resolve_device
from storage.checkpoints import Checkpoint
from storage.errors import StoreError
from storage.hashing import config_hash
from storage.run_dir import RunDir
from storage.teacher_fingerprint import check_teacher_unchanged
from storage.trajectory_store import TrajectoryStore

# Where the data lives, how long to train and how often to save don't change what any one
# iteration computes; everything else (seed, method) does and names the run.
HASH_EXCLUDED = frozenset({"trajectories", "out", "iterations", "checkpoint_every", "keep_checkpoints", "device"})
# Wall-clock fields of a metrics line: the only ones that differ between identical runs.
TIMING_FIELDS = ("seconds", "data_wait_seconds")


class DistillRunConfig(BaseModel):
    """Stage B: distil the teacher of a trajectory store into a few-step LoRA student (RAPM)."""

    model_config = ConfigDict(extra="forbid")

    trajectories: str = Field(description="trajectory store (made by `rapm trajectories`)")
    out: str = Field(description="run dir to create, or to resume/extend if it was made with the same config")
    # The paper's SDXL run: 20K iterations at batch size 1.
    iterations: int = Field(20000, ge=1, description="total optimizer steps (extend a finished run by raising it)")
    checkpoint_every: int = Field(500, ge=1, description="save a checkpoint every this many iterations (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept on disk (oldest deleted first)")
    seed: int = Field(0, ge=0, description="seed of the data order and of all training noise (weights init: --init-seed)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device")
    method: DistillConfig = Field(default_factory=DistillConfig, description="RAPM hyperparameters")


class DistillationDivergedError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left as it was."""


@dataclass(frozen=True)
class Progress:
    done: int  # iterations completed in the run (resumed ones included)
    total: int
    seconds_per_iteration: float  # over this call's iterations

    @property
    def eta_s(self) -> float:
        return (self.total - self.done) * self.seconds_per_iteration


@dataclass(frozen=True)
class DistillResult:
    run_dir: str
    step: int  # iterations the exported student has had
    trained: int  # iterations this call ran (0 when the run was already done)
    already_done: bool
    export_dir: str
    seconds_per_iteration: float | None
    config_hash: str


def run_config_hash(config: DistillRunConfig) -> str:
    return config_hash(hashed_config(config))


def hashed_config(config: DistillRunConfig) -> dict:
    return config.model_dump(mode="json", exclude=set(HASH_EXCLUDED))


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The trajectories of one epoch, shuffled by (seed, epoch) alone, so any cursor can be rebuilt."""
    return np.random.default_rng([seed, epoch]).permutation(indices)


class DataOrder:
    """Seeded per-epoch permutations addressed by a cursor (epoch, position): the whole data state."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices, self.seed = indices, seed
        self._epoch, self._order = -1, indices

    def at(self, cursor: tuple[int, int]) -> int:
        epoch, position = cursor
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.indices, self.seed, epoch)
        return int(self._order[position])

    def after(self, cursor: tuple[int, int]) -> tuple[int, int]:
        epoch, position = cursor
        return (epoch + 1, 0) if position + 1 == len(self.indices) else (epoch, position + 1)


def load_example(store: TrajectoryStore, index: int) -> Example:
    rec = store.read(index)

    def row(name: str) -> torch.Tensor | None:
        value = rec[name]
        return None if value is None else torch.from_numpy(np.asarray(value, dtype=np.float32))[None]

    cond = Conditioning(row("prompt_embeds"), row("pooled_prompt_embeds"), row("time_ids"))
    positions = torch.from_numpy(np.asarray(rec["positions"], dtype=np.float32))
    return Example(positions=positions, cond=cond, index=int(index))


class Fetched(NamedTuple):
    example: Example
    epoch: int  # the data epoch the example belongs to
    next_cursor: tuple[int, int]  # where the data order stands once this example is consumed
    wait_seconds: float  # how long the training loop waited for it (0 when prefetch kept up)


def prefetched(store: TrajectoryStore, order: DataOrder, cursor: tuple[int, int], count: int) -> Iterator[Fetched]:
    """``count`` examples from ``cursor`` on, each read from Zarr on a thread while the previous one trains."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        upcoming = pool.submit(load_example, store, order.at(cursor)) if count else None
        for i in range(count):
            t0 = time.perf_counter()
            example = upcoming.result()
            waited = time.perf_counter() - t0
            epoch, cursor = cursor[0], order.after(cursor)
            if i + 1 < count:
                upcoming = pool.submit(load_example, store, order.at(cursor))
            yield Fetched(example, epoch, cursor, waited)


def _rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_record(config: DistillRunConfig, store: TrajectoryStore) -> dict:
    return {
        "config": hashed_config(config),
        "config_hash": run_config_hash(config),
        "store_config_hash": store.attrs["config_hash"],
        "teacher": store.attrs["teacher"],
        "teacher_revision": store.attrs.get("teacher_revision"),
        # Snapshotted at the first start: a store still being filled must not reshuffle a resumed run.
        "trajectories": [int(i) for i in store.complete_indices()],
    }


def already_done(config: DistillRunConfig) -> dict | None:
    """The run's ``done.json`` if it already reached ``config.iterations``; raises on a foreign run dir."""
    store = TrajectoryStore(config.trajectories)
    run = RunDir(config.out)
    if run.check(_run_record(config, store)) is None:
        return None
    done = run.done()
    return done if done is not None and done["step"] >= config.iterations else None


def run_distillation(
    config: DistillRunConfig,
    progress: Callable[[Progress], None] | None = None,
    log: Callable[[str], None] = print,
) -> DistillResult:
    """Train (or resume, or extend) the run at ``config.out`` to ``config.iterations``, then export."""
    store = TrajectoryStore(config.trajectories)
    attrs = store.attrs
    run = RunDir(config.out, keep_checkpoints=config.keep_checkpoints)
    record = run.claim(_run_record(config, store))
    h = record["config_hash"]
    done = run.done()
    if done is not None and done["step"] >= config.iterations:
        log(f"{run.path}: already trained to {done['step']} iterations (≥ {config.iterations}); nothing to do")
        return DistillResult(str(run.path), done["step"], 0, True, str(run.export_dir), None, h)
    indices = np.asarray(record["trajectories"], dtype=np.int64)
    if len(indices) == 0:
        raise StoreError(f"{config.trajectories}: no complete trajectories; finish `rapm trajectories` first")
    if not store.complete_mask()[indices].all():
        raise StoreError(f"{config.trajectories}: trajectories this run trains on are no longer complete")

    device = resolve_device(config.device)
    try:
        grid = SlotGrid.from_scheduler(attrs["scheduler_config"], attrs["num_slots"], attrs["steps_per_slot"])
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_teacher_unchanged(attrs, config.trajectories)
    unet = load_unet(attrs["teacher"], attrs.get("teacher_revision"), device=device)
    _seed_everything(config.seed)
    distiller = Distiller(unet, attrs["scheduler_config"], grid, config.method, device=device)
    generator = torch.Generator().manual_seed(config.seed)  # CPU: the Distiller draws on CPU, then moves

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = run.checkpoints.load()
    for w in caught:
        log(f"warning: {w.message}")
    if ckpt is None:
        step, cursor, nonfinite_run = 0, (0, 0), 0
        run.metrics.truncate(0)
    else:
        distiller.load_trainable_state_dict(ckpt.trainable)
        distiller.load_optimizer_state_dict(ckpt.optimizer)
        _set_rng_state(ckpt.rng, generator)
        step, cursor = ckpt.step, (ckpt.cursor["epoch"], ckpt.cursor["position"])
        nonfinite_run = ckpt.cursor["consecutive_nonfinite"]
        run.metrics.truncate(ckpt.metrics_lines)
        log(f"resuming {run.path} from checkpoint {ckpt.path.name}")
    if done is not None:
        run.unmark_done()

    def save_checkpoint() -> None:
        run.checkpoints.save(Checkpoint(
            step=step, trainable=distiller.trainable_state_dict(), optimizer=distiller.optimizer_state_dict(),
            rng=_rng_state(generator), metrics_lines=run.metrics.sync(), config=record["config"], config_hash=h,
            cursor={"epoch": cursor[0], "position": cursor[1], "consecutive_nonfinite": nonfinite_run},
        ))

    order = DataOrder(indices, config.seed)
    start_step, t_start = step, time.perf_counter()
    log_every = max(1, min(100, config.iterations // 20))
    examples = prefetched(store, order, cursor, config.iterations - step)
    with run.metrics, closing(examples):
        for example, epoch, cursor, t_data in examples:  # from here on the cursor names the next example
            t0 = time.perf_counter()
            try:
                row = distiller.train_step(example, generator)
                nonfinite_run = 0
            except NonFiniteLossError as err:
                nonfinite_run += 1
                failure = f"non-finite {err.term} loss on trajectory {err.index}, slot {err.slot}"
                log(f"iteration {step + 1}: {failure}; example skipped ({nonfinite_run} in a row)")
                row = {"nonfinite": {"term": err.term, "slot": err.slot}}
            step += 1
            run.metrics.append({"iteration": step, "epoch": epoch, "trajectory": example.index, **row,
                                "seconds": time.perf_counter() - t0 + t_data, "data_wait_seconds": t_data})
            if nonfinite_run >= config.method.max_consecutive_nonfinite:
                raise DistillationDivergedError(
                    f"{nonfinite_run} consecutive non-finite losses (last: {failure}); the last good checkpoint "
                    f"in {run.checkpoints.dir} is intact; lower --lr or check the trajectory store")
            if step % config.checkpoint_every == 0 or step == config.iterations:
                save_checkpoint()
            p = Progress(step, config.iterations, (time.perf_counter() - t_start) / (step - start_step))
            if step % log_every == 0 or step == config.iterations:
                log(f"iteration {step}/{config.iterations}: {p.seconds_per_iteration:.3f} s/iter, ETA {p.eta_s:.0f} s")
            if progress is not None:
                progress(p)
    trained = step - start_step
    sec_per_iter = (time.perf_counter() - t_start) / trained if trained else None

    card = {
        "teacher": attrs["teacher"], "teacher_revision": attrs.get("teacher_revision"), "iterations": step,
        "num_slots": attrs["num_slots"], "steps_per_slot": attrs["steps_per_slot"],
        "teacher_guidance": attrs["guidance"], "trajectories": len(indices), "run_config_hash": h,
        "trajectory_store_config_hash": attrs["config_hash"], "config": record["config"],
    }
    with run.replacing("export") as tmp:
        distiller.export(tmp, teacher=attrs["teacher"], model_card=card)
    plot_loss_curves(run.metrics.read(), run.path / "loss_curves.png",
                     title=f"{Path(attrs['teacher']).name} · {h[:8]} · {step} iterations")
    run.mark_done({"step": step, "config_hash": h, "export": "export"})
    log(f"{run.path}: trained {trained} iterations (now at {step}); student exported to {run.export_dir}")
    return DistillResult(str(run.path), step, trained, False, str(run.export_dir), sec_per_iter, h)


# -- Prefect wiring ------------------------------------------------------------------------------
def run_name(config: DistillRunConfig) -> str:
    try:
        teacher = Path(str(TrajectoryStore(config.trajectories).attrs["teacher"])).name
    except StoreError:
        teacher = "unknown-teacher"
    return f"distill-{teacher}-{run_config_hash(config)[:8]}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return run_name(DistillRunConfig.model_validate(flow_run.parameters["config"]))


def summary_rows(rows: list[dict], buckets: int = 10) -> list[dict]:
    """Mean of every numeric metric over ``buckets`` equal spans of iterations (for the table artifact)."""
    rows = [r for r in rows if "nonfinite" not in r]
    if not rows:
        return []
    size = math.ceil(len(rows) / buckets)
    table = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        keys = [k for k, v in chunk[0].items() if isinstance(v, (int, float)) and k not in ("iteration", "epoch", "trajectory")]
        table.append({"iterations": f"{chunk[0]['iteration']}-{chunk[-1]['iteration']}",
                      **{k: round(sum(r.get(k, 0.0) for r in chunk) / len(chunk), 5) for k in keys}})
    return table


def _distill_flow(config: DistillRunConfig) -> dict:
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"distill → {config.out}")
    shown = [0]

    def report(p: Progress) -> None:
        percent = int(100 * p.done / p.total)  # one API call per percent, not per iteration
        if percent != shown[0]:
            shown[0] = percent
            update_progress_artifact(artifact, float(percent))

    result = run_distillation(config, progress=report, log=logger.info)
    update_progress_artifact(artifact, 100.0)
    table = summary_rows(RunDir(config.out).metrics.read())
    if table:
        create_table_artifact(table=table, key=f"distill-metrics-{result.config_hash[:12]}",
                              description=f"mean metrics over iteration spans of {config.out}")
    return asdict(result)


def _make_flow():
    from prefect import flow

    return flow(name="distill", flow_run_name=_flow_run_name)(_distill_flow)


distill_flow = _make_flow()


# -- CLI -----------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser("distill", help="Stage B: distil the store's teacher into a few-step LoRA student",
                                   description=DistillRunConfig.__doc__)
    add_model_arguments(parser, DistillRunConfig)
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    config = model_from_args(DistillRunConfig, args)
    done = already_done(config)
    if done is not None:
        print(f"{config.out}: already trained to {done['step']} iterations; nothing to do")
        return 0
    resolve_device(config.device)
    result = distill_flow(config)
    print(f"{result['run_dir']}: {result['step']} iterations, student in {result['export_dir']}"
          + (f" ({result['seconds_per_iteration']:.3f} s/iter)" if result["seconds_per_iteration"] else ""))
    return 0
