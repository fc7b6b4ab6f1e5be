"""Stage B's engine: trajectory store → run dir, one training loop for every method.

Each iteration takes the next trajectory of a seeded per-epoch permutation (read ahead on a
thread), makes one ``Trainer.train_step`` with the run's own ``torch.Generator``, and appends
one line to ``metrics.jsonl``. Resume is exact: a checkpoint holds the weights, both optimizers,
every RNG state, the data cursor and the metrics line count, so a run killed at any moment and
restarted ends bit-identical to one never stopped (on the same device). A run dir belongs to
one config hash and one trajectory store; how long it trains, where it runs and how often it
saves don't change what an iteration computes, so a finished run can be extended (more
``--iterations``), moved to another device or checkpointed differently.
"""

from __future__ import annotations

import time
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import DistillRunConfig
from rapm_core.distill.data import DataOrder, prefetched
from rapm_core.distill.lcm import LCM_ON_FLOW
from rapm_core.distill.plots import plot_loss_curves
from rapm_core.distill.previews import open_previews
from rapm_core.distill.renders import render_latents
from rapm_core.distill.rng import rng_state, seed_everything, set_rng_state
from rapm_core.distill.method import GuidedTeacher
from rapm_core.distill.trainer import NonFiniteLossError, Trainer
from rapm_core.errors import ConfigError
from rapm_core.progress import Progress
from rapm_core.ode import SlotGrid
from rapm_core.teacher import load_unet, pipeline_arguments, resolve_device, resolve_dtype
from storage.checkpoints import Checkpoint
from storage.errors import StoreError, reporting_full_disk
from storage.hashing import config_hash
from storage.manifest import write_manifest
from storage.run_dir import DamagedRunFileError, RunDir
from storage.teacher_fingerprint import check_teacher_unchanged
from storage.trajectory_store import TrajectoryStore
from storage.urls import is_url

# Wall-clock fields of a metrics line: the only ones that differ between identical runs.
TIMING_FIELDS = ("seconds", "data_wait_seconds")


class DistillationDivergedError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left as it was."""


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
    return config_hash(config.hashed())


def run_record(config: DistillRunConfig, store: TrajectoryStore) -> dict:
    """``run.json``: what the run is (its config and the store's) and what it trains on."""
    path = config.trajectories if is_url(config.trajectories) else str(Path(config.trajectories).resolve())
    return {
        "config": config.hashed(),
        "config_hash": run_config_hash(config),
        "store_config_hash": store.schema.config_hash,
        "trajectory_store": path,
        "teacher": store.schema.teacher,
        "teacher_revision": store.schema.teacher_revision,
        # Snapshotted at the first start: a store still being filled must not reshuffle a resumed run.
        "trajectories": [int(i) for i in store.complete_indices()],
    }


def already_done(config: DistillRunConfig) -> dict | None:
    """The run's ``done.json`` if it already reached ``config.iterations`` and its export checks out;
    raises on a foreign run dir or a method the store cannot train (the checks a command makes before
    Prefect starts). A damaged ``done.json`` or export is work for the run loop (None)."""
    store = TrajectoryStore(config.trajectories)
    check_method_fits(config, store)
    run = RunDir(config.out)
    if run.check(run_record(config, store)) is None:
        return None
    try:
        done = run.done()
    except DamagedRunFileError:
        return None
    if done is None or done["step"] < config.iterations or run.export_problem() is not None:
        return None
    return done


def check_method_fits(config: DistillRunConfig, store: TrajectoryStore) -> None:
    """Refuse a method the store cannot train (e.g. a relative offset d ≥ M) before the run dir is claimed."""
    schema = store.schema
    if schema.kind == "sd3" and config.trains_discriminators and config.adversarial.disc_layout == "pcm":
        raise ConfigError("--disc-layout pcm reads a UNet's up blocks; an SD3-class teacher has none: "
                          "use --disc-layout down-mid")
    if schema.kind == "sd3" and config.method == "lcm":
        raise ConfigError(LCM_ON_FLOW)
    if config.method == "rapm" and not 0 <= config.rapm.relative_offset < schema.steps_per_slot:
        raise ConfigError(f"--relative-offset {config.rapm.relative_offset} must be below the store's "
                          f"{schema.steps_per_slot} teacher steps per slot (M)")


def build_trainer(config: DistillRunConfig, store: TrajectoryStore) -> Trainer:
    """The run's trainer on the store's teacher UNet (held in ``weights_dtype``), before any checkpoint loads."""
    schema = store.schema
    device = resolve_device(config.device)
    try:
        grid = SlotGrid.from_scheduler(schema.scheduler_config, schema.num_slots, schema.steps_per_slot)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_teacher_unchanged(schema, config.trajectories)
    unet = load_unet(schema.teacher, schema.teacher_revision, dtype=resolve_dtype(config.training.weights_dtype),
                     device=device, kind=schema.kind)
    seed_everything(config.seed)
    teacher = GuidedTeacher(Conditioning.from_arrays(store.uncond()), schema.guidance)
    return Trainer(unet, schema.scheduler_config, grid, config.method_config(), device=device, teacher=teacher)


def run_distillation(
    config: DistillRunConfig,
    progress: Callable[[Progress], None] | None = None,
    log: Callable[[str], None] = print,
    on_checkpoint: Callable[[RunDir], None] | None = None,
) -> DistillResult:
    """Train (or resume, or extend) the run at ``config.out`` to ``config.iterations``, then export.

    The run dir is locked for the whole call: a second process on it is refused at once."""
    run = RunDir(config.out, keep_checkpoints=config.keep_checkpoints)
    with run.lock(), reporting_full_disk(run.path, "the checkpoints written before are intact; free space and "
                                                   "run the same command to resume"):
        return _train(config, run, progress, log, on_checkpoint)


def _finished(run: RunDir, log: Callable[[str], None]) -> dict | None:
    """``done.json``, or None; a damaged one is removed (the run loop rebuilds it from the last checkpoint)."""
    try:
        return run.done()
    except DamagedRunFileError as err:
        log(f"warning: {str(err).split('; ')[0]}; rebuilding the export and done.json from the last checkpoint")
        run.unmark_done()
        return None


def _train(config: DistillRunConfig, run: RunDir, progress: Callable[[Progress], None] | None,
           log: Callable[[str], None], on_checkpoint: Callable[[RunDir], None] | None) -> DistillResult:
    store = TrajectoryStore(config.trajectories)
    check_method_fits(config, store)
    record = run.claim(run_record(config, store))
    h = record["config_hash"]
    done = _finished(run, log)
    target = config.iterations
    if done is not None and done["step"] >= config.iterations:
        if (problem := run.export_problem()) is None:
            log(f"{run.path}: already trained to {done['step']} iterations (≥ {config.iterations}); nothing to do")
            return DistillResult(str(run.path), done["step"], 0, True, str(run.export_dir), None, h)
        # The export is derived data: the last checkpoint (or, if that is damaged, exact resume
        # from an older one) gives the same student again.
        log(f"{run.export_dir}: {problem}; rebuilding the export from the last checkpoint")
        target = done["step"]
    indices = np.asarray(record["trajectories"], dtype=np.int64)
    if len(indices) == 0:
        raise StoreError(f"{config.trajectories}: no complete trajectories; finish `rapm trajectories` first")
    if not store.complete_mask()[indices].all():
        raise StoreError(f"{config.trajectories}: trajectories this run trains on are no longer complete")

    previews = open_previews(config.preview_prompts, store, run, config.device, log)
    trainer = build_trainer(config, store)
    generator = torch.Generator().manual_seed(config.seed)  # CPU: methods draw on CPU, then move
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = run.checkpoints.load()
    for w in caught:
        log(f"warning: {w.message}")
    if ckpt is None:
        step, cursor, nonfinite_run = 0, (0, 0), 0
        run.metrics.truncate(0)
    else:
        trainer.load_trainable_state_dict(ckpt.trainable)
        trainer.load_optimizer_state_dict(ckpt.optimizer)
        set_rng_state(ckpt.rng, generator)
        step, cursor = ckpt.step, (ckpt.cursor["epoch"], ckpt.cursor["position"])
        nonfinite_run = ckpt.cursor["consecutive_nonfinite"]
        kept = run.metrics.truncate(ckpt.metrics_lines)
        if kept < ckpt.metrics_lines:
            log(f"warning: {run.metrics.path} holds {kept} of the {ckpt.metrics_lines} lines checkpoint "
                f"{ckpt.path.name} recorded (deleted or cut); the checkpoints are kept, the lost iterations' lines "
                f"are gone and the log goes on from iteration {ckpt.step + 1}")
        log(f"resuming {run.path} from checkpoint {ckpt.path.name}")
    # A rebuild past --iterations (the run was extended before) ends where the checkpoint is.
    target = max(target, step)
    if done is not None:
        run.unmark_done()

    def save_checkpoint() -> None:
        run.checkpoints.save(Checkpoint(
            step=step, trainable=trainer.trainable_state_dict(), optimizer=trainer.optimizer_state_dict(),
            rng=rng_state(generator), metrics_lines=run.metrics.sync(), config=record["config"], config_hash=h,
            cursor={"epoch": cursor[0], "position": cursor[1], "consecutive_nonfinite": nonfinite_run},
        ))
        if previews is not None:
            t0 = time.perf_counter()
            log(f"preview {previews.write(trainer, step)} ({time.perf_counter() - t0:.2f} s)")
        if on_checkpoint is not None:
            on_checkpoint(run)

    clean = None
    if config.method != "rapm" and config.peer.x0_source == "renders":
        log(f"encoding real renders of {len(indices)} prompts as clean latents")
        clean = render_latents(store, [int(i) for i in indices], trainer.student.device)
    start_step, t_start = step, time.perf_counter()
    log_every = max(1, min(100, target // 20))
    examples = prefetched(store, DataOrder(indices, config.seed), cursor, target - step, clean)
    with run.metrics, closing(examples):
        for example, epoch, cursor, t_data in examples:  # from here on the cursor names the next example
            t0 = time.perf_counter()
            try:
                row = trainer.train_step(example, generator, iteration=step)
                nonfinite_run = 0
            except NonFiniteLossError as err:
                nonfinite_run += 1
                failure = f"non-finite {err.term} loss on trajectory {err.index}, slot {err.slot}"
                log(f"iteration {step + 1}: {failure}; example skipped ({nonfinite_run} in a row)")
                row = {"nonfinite": {"term": err.term, "slot": err.slot}}
            step += 1
            run.metrics.append({"iteration": step, "epoch": epoch, "trajectory": example.index, **row,
                                "seconds": time.perf_counter() - t0 + t_data, "data_wait_seconds": t_data})
            if nonfinite_run >= config.training.max_consecutive_nonfinite:
                raise DistillationDivergedError(
                    f"{nonfinite_run} consecutive non-finite losses (last: {failure}); the last good checkpoint "
                    f"in {run.checkpoints.dir} is intact; lower --lr or check the trajectory store")
            if step % config.checkpoint_every == 0 or step == target:
                save_checkpoint()
            p = Progress(step, target, (step - start_step) / (time.perf_counter() - t_start), "iterations")
            if step % log_every == 0 or step == target:
                log(f"iteration {step}/{target}: {1 / p.rate:.3f} s/iter, ETA {p.eta_s:.0f} s")
            if progress is not None:
                progress(p)
    trained = step - start_step
    sec_per_iter = (time.perf_counter() - t_start) / trained if trained else None
    _export(run, trainer, store, record, step, len(indices))
    log(f"{run.path}: trained {trained} iterations (now at {step}); student exported to {run.export_dir}")
    return DistillResult(str(run.path), step, trained, False, str(run.export_dir), sec_per_iter, h)


def _export(run: RunDir, trainer: Trainer, store: TrajectoryStore, record: dict, step: int, trajectories: int) -> None:
    schema, h = store.schema, record["config_hash"]
    card = {
        "teacher": schema.teacher, "teacher_revision": schema.teacher_revision, "iterations": step,
        "num_slots": schema.num_slots, "steps_per_slot": schema.steps_per_slot,
        "teacher_guidance": schema.guidance, "trajectories": trajectories, "run_config_hash": h,
        "trajectory_store_config_hash": schema.config_hash, "config": record["config"],
    }
    with run.replacing("export") as tmp:
        load_arguments, call_arguments = pipeline_arguments(schema)
        trainer.export(tmp, teacher=schema.teacher, model_card=card, load_arguments=load_arguments,
                       call_arguments=call_arguments)
        write_manifest(tmp, {"step": step, "run_config_hash": h})
    plot_loss_curves(run.metrics.read(), run.path / "loss_curves.png",
                     title=f"{Path(schema.teacher).name} · {h[:8]} · {step} iterations")
    run.mark_done({"step": step, "config_hash": h, "export": "export"})
