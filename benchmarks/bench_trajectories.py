"""Stage A throughput against a bare loop over the stock diffusers UNet (target ≥ 0.95).

"Ours" is ``generate_trajectories`` (what the flow runs): prompt encoding, seeded noise, the
guided N·M-step DDIM chain keeping every position, and the Zarr store with its background
writer. "Bare" is the least a user could write with stock diffusers for the same result: the
same pipeline's ``encode_prompt``, UNet and ``DDIMScheduler.step``, the same batch, steps and
guidance, positions kept in memory, no store. Both use the same loaded pipeline; teacher
loading is excluded from both.

Both run at once in one process, in two threads taking turns one batch each
(``bench_common.Lockstep``), so a busy spell on a shared machine slows both alike. Each batch is
timed from the side's resumption to its end (wall and thread CPU); the first batch (store
creation, warm-up) is left out. Ours' background writer may run during bare's turn: its busy
time, printed too, bounds how much that can flatter the ratio.

Run: ``.venv/bin/python benchmarks/bench_trajectories.py [--num 24] [--batch 4]`` (about 2 minutes here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from bench_common import Lockstep, build_bench_teacher, machine, median, prompt_store
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_core.teacher import load_teacher
from rapm_core.trajectories.chain import trajectory_seed


@torch.no_grad()
def bare_loop(pipe, texts: list[str], seeds: list[int], batch: int, steps: int, guidance: float,
              after_batch: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
    sched = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=0)
    sched.set_timesteps(steps)
    c, h, w = pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size
    out = []
    for a in range(0, len(texts), batch):
        cond, uncond = pipe.encode_prompt(texts[a:a + batch], "cpu", 1, True)
        both = torch.cat([uncond, cond])
        z = randn_tensor((len(cond), c, h, w), generator=[torch.Generator().manual_seed(s) for s in seeds[a:a + batch]])
        positions = [z]
        for t in sched.timesteps:
            eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=both).sample.chunk(2)
            z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
            positions.append(z)
        out.append(torch.stack(positions, dim=1))
        after_batch()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=24, help="trajectories per side")
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
        texts = [f"a {c} shape number {i}" for i, c in enumerate(["red", "green", "blue", "yellow"] * args.num)][:args.num]
        seeds = [trajectory_seed(seed, i) for i in range(args.num)]
        config = TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(root / "store.zarr"),
                                    slots=args.slots, steps_per_slot=args.steps_per_slot, guidance=guidance,
                                    seed=seed, batch_size=args.batch, device="cpu")
        bare_loop(teacher.pipe, texts[:args.batch], seeds, args.batch, 2, guidance)  # warm-up
        lock, reports = Lockstep("ours", "bare"), []

        def ours() -> None:
            lock.wait_turn("ours")
            try:
                reports.append(generate_trajectories(config, teacher=teacher, log=lambda _m: None,
                                                     progress=lambda _p: lock.yield_turn("ours")))
            finally:
                lock.finish("ours")

        thread = threading.Thread(target=ours, name="ours")
        thread.start()
        lock.wait_turn("bare")
        try:
            bare_loop(teacher.pipe, texts, seeds, args.batch, args.slots * args.steps_per_slot, guidance,
                      lambda: lock.yield_turn("bare"))
        finally:
            lock.finish("bare")
        thread.join()
        report = reports[0]
    spans = {k: v[1:] for k, v in lock.spans.items()}
    for k, (b, o) in enumerate(zip(spans["bare"], spans["ours"]), start=2):
        print(f"  batch {k}: bare {b[0]:.3f} s ({b[1]:.3f} CPU), ours {o[0]:.3f} s ({o[1]:.3f} CPU)")
    bw, bc = (sum(x[i] for x in spans["bare"]) for i in (0, 1))
    ow, oc = (sum(x[i] for x in spans["ours"]) for i in (0, 1))
    print(f"machine: {machine()}")
    print(f"workload: {args.num} trajectories per side, batch {args.batch}, N×M = {args.slots}×{args.steps_per_slot}, "
          f"CFG {guidance}, bench UNet {sum(p.numel() for p in teacher.unet.parameters()) / 1e6:.2f} M params; "
          f"{len(spans['bare'])} timed batches each, in turns")
    print(f"totals: bare {bw:.2f} s ({bc:.2f} CPU), ours {ow:.2f} s ({oc:.2f} CPU); ours' writer busy "
          f"{report.write_seconds:.3f} s, stalled {report.wait_seconds:.3f} s")
    print(f"throughput ratio ours/bare = {bw / ow:.3f} wall, {bc / oc:.3f} thread CPU (median per batch "
          f"{median([b[0] / o[0] for b, o in zip(spans['bare'], spans['ours'])]):.3f}) (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
