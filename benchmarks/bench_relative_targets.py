"""RAPM's relative targets: one batched student call per iteration against one call per slot (goal ≤ 0.85×).

The relative targets ẑ_n start from stored teacher positions, so ``Rapm.relative_targets``
computes all of an iteration's in one batch-N call before the slot loop. "Per slot" is the same
method with that call replaced by N batch-1 calls, as the slot loop made them before. Both run
the real ``Trainer.train_step`` on the same trajectories, in two threads taking turns one
iteration each (``bench_common.Lockstep``), so a busy spell on a shared machine slows both alike;
the first iteration of each (set-up, warm-up) is left out. ``gpu_check.py`` runs the same
comparison on a CUDA machine at SD 1.5 size.

Run: ``.venv/bin/python benchmarks/bench_relative_targets.py [--iterations 16]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench_common import ADVERSARIAL, Lockstep, machine
from bench_distill import DISC_CHANNELS, build_store
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.data import load_example
from rapm_core.distill.rapm import slot_targets
from rapm_core.distill.trainer import Trainer
from rapm_core.ode import SlotGrid
from rapm_core.teacher import load_unet
from storage.trajectory_store import TrajectoryStore

SIDES = ("batched", "per-slot")


def one_call_per_slot(trainer: Trainer) -> Trainer:
    """The trainer with its relative targets computed as before batching: one student call per slot."""
    method = trainer.method

    @torch.no_grad()
    def relative_targets(positions, cond, slots):
        if method.config.rapm.loss_relative == "off":
            return [None] * len(slots)
        out = []
        for n in slots:
            t = slot_targets(positions, method.grid, n, method.config.rapm.relative_offset)
            out.append(method.student.jump(t.relative_start, t.relative_time, method.grid.slot_end(n), cond))
        return out

    method.relative_targets = relative_targets
    return trainer


def lockstep_seconds(make_trainer: Callable[[], Trainer], examples: list, iterations: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Wall seconds per iteration of both sides, run in turns; the first iteration left out."""
    trainers = {"batched": make_trainer(), "per-slot": one_call_per_slot(make_trainer())}
    lock = Lockstep(*SIDES)

    def side(name: str) -> None:
        lock.wait_turn(name)
        try:
            gen = torch.Generator().manual_seed(0)
            for i in range(iterations):
                trainers[name].train_step(examples[i % len(examples)], gen, i)
                sync()
                lock.yield_turn(name)
        finally:
            lock.finish(name)

    thread = threading.Thread(target=side, args=("per-slot",), name="per-slot")
    thread.start()
    side("batched")
    thread.join()
    return {k: [wall for wall, _ in v[1:]] for k, v in lock.spans.items()}


def summary(seconds: dict[str, list[float]]) -> dict[str, float]:
    batched, per_slot = (float(np.mean(seconds[k])) for k in SIDES)
    median = float(np.median([b / p for b, p in zip(seconds["batched"], seconds["per-slot"])]))
    return {"batched_s": batched, "per_slot_s": per_slot, "batched_over_per_slot": batched / per_slot,
            "median_batched_over_per_slot": median,
            "iterations": len(seconds["batched"])}


def store_trainers(store_path: str, losses: dict) -> tuple[Callable[[], Trainer], list]:
    """A maker of fresh CPU trainers on the store's teacher (RAPM with ``losses``) and its examples."""
    store = TrajectoryStore(store_path)
    schema = store.schema
    grid = SlotGrid.from_scheduler(schema.scheduler_config, schema.num_slots, schema.steps_per_slot)
    config = MethodConfig.from_options(disc_channels=DISC_CHANNELS, **losses)
    examples = [load_example(store, i) for i in store.complete_indices()]
    return (lambda: Trainer(load_unet(schema.teacher), schema.scheduler_config, grid, config)), examples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--num", type=int, default=4, help="trajectories in the store")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--steps-per-slot", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp), args.num, args.slots, args.steps_per_slot)
        for label, losses in (("pointwise (default)", {}), ("adversarial", ADVERSARIAL)):
            make, examples = store_trainers(store, losses)
            s = summary(lockstep_seconds(make, examples, args.iterations))
            print(f"{label}: batched {s['batched_s']:.3f} s/iter, per slot {s['per_slot_s']:.3f} s/iter, "
                  f"ratio {s['batched_over_per_slot']:.3f} "
                  f"(median per-iteration {s['median_batched_over_per_slot']:.3f}) over "
                  f"{s['iterations']} iterations each, N×M = {args.slots}×{args.steps_per_slot} (goal <= 0.85)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
