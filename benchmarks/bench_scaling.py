"""How the costs scale: trajectories/s vs batch size, s/iteration vs N and LoRA rank, store size vs N·M.

All on the benchmark teacher (bench_common.BENCH_UNET, 16×16 latents):
- Stage A: ``generate_trajectories`` of 8 trajectories, N×M = 4×4, for batch sizes 1, 2, 4, 8
  (best of 2 runs each: other jobs on a shared machine only add time);
- Stage B: ``Trainer.train_step`` (default method, disc_channels 64, M = 2) on stored-shape
  random trajectories, best of 4 iterations after one warm-up, for N = 2, 4, 8 at rank 1 and
  for ranks 1, 4, 16 at N = 4. Per-iteration cost should grow linearly in N (one student call,
  one relative jump and two discriminator calls per slot) and barely with the rank;
- the store: bytes on disk per trajectory for N×M = 4×2, 4×5, 4×10, 8×5 (fp16, zstd-5), which
  should follow the N·M + 1 stored positions.

Run: ``.venv/bin/python benchmarks/bench_scaling.py`` (about 3 minutes here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import ADVERSARIAL, Timer, build_bench_teacher, machine, prompt_store
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.method import Example
from rapm_core.distill.trainer import Trainer
from rapm_core.ode import SlotGrid
from rapm_core.teacher import load_teacher, load_unet
from storage.trajectory_inspect import inspect_store


def trajectories_per_second(root: Path, teacher_dir: Path, teacher, prompts: Path, batch: int, num: int) -> float:
    best = float("inf")
    for run in range(2):
        config = TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(root / f"b{batch}-{run}.zarr"),
                                    slots=4, steps_per_slot=4, batch_size=batch, device="cpu")
        with Timer() as t:
            generate_trajectories(config, teacher=teacher, log=lambda _m: None)
        best = min(best, t.seconds)
    return num / best


def seconds_per_iteration(teacher_dir: Path, scheduler_config: dict, slots: int, rank: int, iterations: int = 4) -> float:
    grid = SlotGrid.from_scheduler(scheduler_config, slots, 2)
    method = MethodConfig.from_options(rank=rank, disc_channels=64, **ADVERSARIAL)
    distiller = Trainer(load_unet(teacher_dir), scheduler_config, grid, method)
    gen = torch.Generator().manual_seed(0)
    example = Example(torch.randn(grid.total_steps + 1, 4, 16, 16, generator=gen),
                      Conditioning(torch.randn(1, 32, 32, generator=gen)), 0)
    distiller.train_step(example, gen)  # warm-up
    best = float("inf")
    for _ in range(iterations):
        t0 = time.perf_counter()
        distiller.train_step(example, gen)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dir = build_bench_teacher(root / "teacher")
        teacher = load_teacher(teacher_dir)
        num = 8
        prompts = prompt_store(root / "prompts", num)

        print(f"machine: {machine()}\n")
        print("| batch | trajectories/s |\n|---|---|")
        for batch in (1, 2, 4, 8):
            print(f"| {batch} | {trajectories_per_second(root, teacher_dir, teacher, prompts, batch, num):.2f} |", flush=True)

        print("\n| N (M = 2) | LoRA rank | s/iteration |\n|---|---|---|")
        for slots, rank in ((2, 1), (4, 1), (8, 1), (4, 4), (4, 16)):
            print(f"| {slots} | {rank} | {seconds_per_iteration(teacher_dir, teacher.scheduler_config, slots, rank):.3f} |",
                  flush=True)

        print("\n| N×M | positions | bytes/trajectory on disk | per position |\n|---|---|---|---|")
        small = prompt_store(root / "prompts4", 4)
        for slots, m in ((4, 2), (4, 5), (4, 10), (8, 5)):
            config = TrajectoriesConfig(prompts=str(small), teacher=str(teacher_dir), out=str(root / f"n{slots}m{m}.zarr"),
                                        slots=slots, steps_per_slot=m, batch_size=4, device="cpu")
            generate_trajectories(config, teacher=teacher, log=lambda _m: None)
            info = inspect_store(config.out)
            per = info["bytes_on_disk"] / info["total"]
            print(f"| {slots}×{m} | {slots * m + 1} | {per:,.0f} | {info['positions_bytes_on_disk'] / info['total'] / (slots * m + 1):,.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
