"""What storing trajectories costs Stage A: generation with the store vs without (target ≤ 3 %).

"With" is ``generate_trajectories`` into a fresh Zarr store: its background writer thread
converts, compresses (zstd-5, byte shuffle) and writes each batch while the next is generated.
"Without" is the same loop over the same ``rapm_core`` calls (prompt encoding, seeded noise, the
guided chain) with the positions dropped. Cost = (with − without) / without, from the best
(minimum) time of each over alternating repeats after a warm-up: other jobs on a shared machine
only ever add time, so minima estimate the undisturbed cost; the median of the per-pair costs
and the same in CPU time (all threads, so it counts the writer's work even where it overlaps)
are printed too. Also printed: the writer's busy time and the CPU time spent outside the
generating thread (what the overlap hides; if it were not overlapped at all, the cost would be
about this), and how long generation stalled on a full write queue.

Run: ``.venv/bin/python benchmarks/bench_store_writes.py [--num 12] [--batch 4] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench_common import Timer, build_bench_teacher, machine, median, prompt_store
from flows.trajectories import TrajectoriesConfig, generate_trajectories
from rapm_core.schedule import SlotGrid
from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher
from rapm_core.trajectory import initial_noise, teacher_trajectories, trajectory_seed


def generate_without_store(teacher, texts: list[str], seeds: list[int], grid: SlotGrid, batch: int,
                           guidance: float) -> None:
    uncond = encode_uncond(teacher)
    for a in range(0, len(texts), batch):
        cond = encode_prompts(teacher, texts[a:a + batch])
        noise = initial_noise(seeds[a:a + batch], teacher.latent_shape, teacher.dtype, teacher.device)
        teacher_trajectories(teacher.unet, teacher.scheduler_config, grid, noise, cond, uncond, guidance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--steps-per-slot", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
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

        def with_store(run: int):
            config = TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(root / f"s{run}.zarr"),
                                        slots=args.slots, steps_per_slot=args.steps_per_slot, guidance=guidance,
                                        seed=seed, batch_size=args.batch, device="cpu")
            with Timer() as t:
                report = generate_trajectories(config, teacher=teacher, log=lambda _m: None)
            return t, report

        def without() -> Timer:
            with Timer() as t:
                generate_without_store(teacher, texts, seeds, grid, args.batch, guidance)
            return t

        without(), with_store(-1)  # warm-up
        rows = []
        for r in range(args.repeats):
            # Alternate which runs first, so a drift in the machine's load favours neither.
            if r % 2:
                stored, report = with_store(r)
                bare = without()
            else:
                bare = without()
                stored, report = with_store(r)
            rows.append((bare, stored, report.write_seconds, report.wait_seconds, stored.cpu - stored.thread_cpu))
            print(f"  pair {r}: without {bare.seconds:.2f} s, with {stored.seconds:.2f} s, "
                  f"cost {100 * (stored.seconds / bare.seconds - 1):+.1f} % wall, {100 * (stored.cpu / bare.cpu - 1):+.1f} % CPU, "
                  f"writer busy {report.write_seconds:.3f} s, stalled {report.wait_seconds:.3f} s", flush=True)
    best = min(r[1].seconds for r in rows) / min(r[0].seconds for r in rows) - 1
    wall = median([r[1].seconds / r[0].seconds - 1 for r in rows])
    cpu = min(r[1].cpu for r in rows) / min(r[0].cpu for r in rows) - 1
    off_main = median([r[4] / r[1].thread_cpu for r in rows])
    print(f"machine: {machine()}")
    print(f"workload: {args.num} trajectories, batch {args.batch}, N×M = {args.slots}×{args.steps_per_slot}, "
          f"fp16 positions, zstd-5")
    print(f"best of {args.repeats}: without {min(r[0].seconds for r in rows):.2f} s, with {min(r[1].seconds for r in rows):.2f} s; "
          f"writer busy {median([r[2] for r in rows]):.3f} s, stalled {median([r[3] for r in rows]):.3f} s, CPU off the "
          f"generating thread {median([r[4] for r in rows]):.3f} s = {100 * off_main:.2f} % of its CPU (medians)")
    print(f"cost of writing = {100 * best:+.2f} % (best-of wall; median of pairs {100 * wall:+.2f} %, best-of CPU "
          f"{100 * cpu:+.2f} %) of generation time (target <= 3 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
