"""What storing trajectories costs Stage A: generation with the store vs without (target ≤ 3 %).

"With" is ``generate_trajectories`` into a Zarr store: each batch's positions are converted to
fp16 and handed to the store's background writer thread, which compresses (zstd-5, byte
shuffle) and writes them while the next batch is generated. "Without" is the same loop over
the same ``rapm_core`` calls (prompt encoding, seeded noise, the guided chain) with the
positions dropped.

Both run at once in one process, in two threads taking turns one batch each
(``bench_common.Lockstep``), so a busy spell on a shared machine slows both alike; the first
batch (store creation, warm-up) is left out. Two numbers:
- the cost on the generating thread: (with − without) / without over the same batches, in wall
  time and thread CPU time: conversion, hand-over and any GIL contention from the writer; this
  is what overlapping cannot hide;
- the writer's own CPU time over the generating thread's: hidden whenever a core is free while
  the UNet runs (always on a GPU machine); on a CPU-bound machine it is the extra cost.

Run: ``.venv/bin/python benchmarks/bench_store_writes.py [--num 32] [--batch 4]`` (about 2 minutes here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from bench_common import Lockstep, build_bench_teacher, machine, prompt_store
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_core.ode import SlotGrid
from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher
from rapm_core.trajectories.chain import initial_noise, teacher_trajectories, trajectory_seed


def generate_without_store(teacher, texts: list[str], seeds: list[int], grid: SlotGrid, batch: int,
                           guidance: float, after_batch: Callable[[], None] = lambda: None) -> None:
    uncond = encode_uncond(teacher)
    for a in range(0, len(texts), batch):
        cond = encode_prompts(teacher, texts[a:a + batch])
        noise = initial_noise(seeds[a:a + batch], teacher.latent_shape, teacher.dtype, teacher.device)
        teacher_trajectories(teacher.unet, teacher.scheduler_config, grid, noise, cond, uncond, guidance)
        after_batch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--steps-per-slot", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    guidance, seed = 7.5, 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dir = build_bench_teacher(root / "teacher")
        prompts = prompt_store(root / "prompts", args.num)
        teacher = load_teacher(teacher_dir)
        grid = SlotGrid.from_scheduler(teacher.scheduler_config, args.slots, args.steps_per_slot)
        texts = [f"a {c} shape number {i}" for i, c in enumerate(["red", "green", "blue", "yellow"] * args.num)][:args.num]
        seeds = [trajectory_seed(seed, i) for i in range(args.num)]
        config = TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(root / "store.zarr"),
                                    slots=args.slots, steps_per_slot=args.steps_per_slot, guidance=guidance,
                                    seed=seed, batch_size=args.batch, device="cpu")
        generate_without_store(teacher, texts[:args.batch], seeds, grid, args.batch, guidance)  # warm-up
        lock, reports = Lockstep("with", "without"), []
        cpu0 = time.process_time()

        def with_store() -> None:
            lock.wait_turn("with")
            try:
                reports.append(generate_trajectories(config, teacher=teacher, log=lambda _m: None,
                                                     progress=lambda _p: lock.yield_turn("with")))
            finally:
                lock.finish("with")

        thread = threading.Thread(target=with_store, name="with")
        thread.start()
        lock.wait_turn("without")
        try:
            generate_without_store(teacher, texts, seeds, grid, args.batch, guidance, lambda: lock.yield_turn("without"))
        finally:
            lock.finish("without")
        thread.join()
        process_cpu = time.process_time() - cpu0
        report = reports[0]
    all_spans = lock.spans
    spans = {k: v[1:] for k, v in all_spans.items()}
    (ww, wc), (nw, nc) = ([sum(x[i] for x in spans[k]) for i in (0, 1)] for k in ("with", "without"))
    # Everything the process did besides the two generating threads: the writer, zarr's I/O loop.
    others = process_cpu - sum(x[1] for k in all_spans for x in all_spans[k])
    for k, (w, n) in enumerate(zip(spans["with"], spans["without"]), start=2):
        print(f"  batch {k}: without {n[0]:.3f} s ({n[1]:.3f} CPU), with {w[0]:.3f} s ({w[1]:.3f} CPU)")
    print(f"machine: {machine()}")
    print(f"workload: {args.num} trajectories per side, batch {args.batch}, N×M = {args.slots}×{args.steps_per_slot}, "
          f"fp16 positions, zstd-5; {len(spans['with'])} timed batches each, in turns")
    print(f"generating thread: without {nw:.2f} s ({nc:.2f} CPU), with {ww:.2f} s ({wc:.2f} CPU) → cost "
          f"{100 * (ww / nw - 1):+.2f} % wall, {100 * (wc / nc - 1):+.2f} % CPU (target <= 3 %)")
    print(f"writer: busy {report.write_seconds:.3f} s, generation stalled {report.wait_seconds:.3f} s; CPU outside the "
          f"generating threads {others:.3f} s = {100 * others / nc:.2f} % of the generating thread's CPU "
          f"(hidden when a core is free)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
