"""Stage A speed: trajectories/s and the writer's share of the time, on the tiny teachers.

Runs ``generate_trajectories`` (the function the flow calls) with N = 4, M = 10, batch 4 on
tiny SD 1.5 and SDXL teachers and prints one Markdown row per teacher. ``write/gen`` is the
background writer's busy time over generation time (target ≤ 3 %); ``stall`` is how long
generation waited on a full write queue.

Run: ``.venv/bin/python benchmarks/trajectory_throughput.py [--num 16] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_core.teacher import load_teacher, resolve_device
from rapm_testing.tiny_teacher import build_tiny_sd15, build_tiny_sdxl
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| teacher | device | N×M | batch | trajectories | traj/s | write/gen | stall s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [f"a {c} shape number {i}" for i, c in enumerate(["red", "green", "blue", "yellow"] * args.num)][:args.num]
        write_prompt_store(root / "prompts", [PromptRecord(prompt_id(t), t, "train") for t in texts])
        for name, build in (("tiny-sd15", build_tiny_sd15), ("tiny-sdxl", build_tiny_sdxl)):
            config = TrajectoriesConfig(prompts=str(root / "prompts"), teacher=str(build(root / name)),
                                        out=str(root / f"{name}.zarr"), slots=4, steps_per_slot=10, batch_size=4,
                                        device=args.device)
            teacher = load_teacher(config.teacher, device=resolve_device(args.device))  # load time not counted
            generate_trajectories(config, stop=4, teacher=teacher, log=lambda _m: None)  # warm-up batch
            rep = generate_trajectories(config, start=4, teacher=teacher, log=lambda _m: None)
            gen_s = rep.seconds
            print(f"| {name} | {teacher.device} | 4×10 | 4 | {rep.generated} | {rep.generated / gen_s:.2f} | "
                  f"{100 * rep.write_seconds / gen_s:.1f} % | {rep.wait_seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
