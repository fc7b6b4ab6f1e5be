"""Distillation speed and peak memory against a bare PyTorch loop (targets ≤ 1.05 and ≤ 1.10).

"Ours" is ``run_distillation`` (what ``rapm distill`` runs): trajectories read from the Zarr
store on a prefetch thread, the ``Trainer`` step (``bench_common.ADVERSARIAL``: adversarial
relative and absolute losses, all slots), a metrics line per iteration. "Bare" is the same computation
as the one-screen reference iteration (``rapm_core/distill/reference.py``, which a test holds
bit-identical to the ``Trainer``) over examples already in memory: the batched relative jumps
(no grad), per slot the student jump, the frozen backbone's down/mid features of the re-noised
fake and reals, two head sets, hinge losses, two backwards; AdamW on LoRA and heads once per
iteration. Same UNet, LoRA (peft, rank 1), heads, optimizers and data.

Speed: both loops run at once in one process, in two threads taking turns one iteration each
(``bench_common.Lockstep``), so a busy spell on a shared machine slows both alike. Each side's
iteration is timed from its resumption to its end, in wall time and in its thread's CPU time;
the first iteration (set-up, warm-up) and the last (``run_distillation`` checkpoints there, a
per-run cost) are left out. The ratio is total ours / total bare over the same iterations. Memory: each loop runs alone
in a fresh subprocess that imports the same modules first; RSS is sampled every 5 ms during the
loop; its peak and its growth over the RSS before the loop are compared.

Run: ``.venv/bin/python benchmarks/bench_distill.py [--iterations 12]`` (about 4 minutes here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from typing import Callable

import numpy as np
import torch

from bench_common import ADVERSARIAL, Lockstep, PeakRSS, build_bench_teacher, machine, prompt_store
from rapm_core.distill.config import DistillRunConfig, MethodConfig
from rapm_core.distill.data import load_example
from rapm_core.distill.discriminator import FeatureTaps, HeadSet
from rapm_core.distill.reference import rapm_iteration
from rapm_core.distill.run import run_distillation
from rapm_core.distill.student import Student
from rapm_core.ode import SlotGrid
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_core.teacher import load_unet
from storage.trajectory_store import TrajectoryStore

DISC_CHANNELS = 64  # a quarter of the default width keeps the benchmark short; both loops use it


def method() -> MethodConfig:
    return MethodConfig.from_options(disc_channels=DISC_CHANNELS, **ADVERSARIAL)


def bare_loop(store_path: str, iterations: int, after_iteration: Callable[[], None] = lambda: None,
              seed: int = 0) -> None:
    """The same passes as ``Trainer.train_step`` (RAPM, adversarial): the one-screen reference
    iteration (``rapm_core/distill/reference.py``) over examples in memory."""
    store = TrajectoryStore(store_path)
    schema, config = store.schema, method()
    training, adv = config.training, config.adversarial
    examples = [load_example(store, i) for i in store.complete_indices()]  # in memory before timing
    grid = SlotGrid.from_scheduler(schema.scheduler_config, schema.num_slots, schema.steps_per_slot)
    student = Student(load_unet(schema.teacher), schema.scheduler_config, training)
    taps = FeatureTaps(student.unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.init_seed)
        heads = torch.nn.ModuleDict({k: HeadSet(taps.channels, adv.disc_channels) for k in ("rel", "abs")})
    g_opt = torch.optim.AdamW(student.lora_params, lr=training.lr, betas=training.betas,
                              weight_decay=training.weight_decay)
    d_opt = torch.optim.AdamW(heads.parameters(), lr=adv.lr_disc, betas=adv.disc_betas or training.betas,
                              weight_decay=training.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for it in range(iterations):
        rapm_iteration(student, grid, config, examples[it % len(examples)], gen, heads, taps, g_opt, d_opt, it)
        after_iteration()


def ours_loop(store_path: str, out: str, iterations: int, after_iteration: Callable[[], None] = lambda: None) -> None:
    config = DistillRunConfig(trajectories=store_path, out=out, iterations=iterations, device="cpu", **dict(method()))
    run_distillation(config, progress=lambda _p: after_iteration(), log=lambda _m: None)


def lockstep_speed(store: str, out: str, iterations: int) -> dict[str, list[tuple[float, float]]]:
    """Per-iteration (wall, thread CPU) spans of both loops run in turns; iterations 2 … I−1."""
    lock = Lockstep("ours", "bare")

    def ours() -> None:
        lock.wait_turn("ours")
        try:
            ours_loop(store, out, iterations, lambda: lock.yield_turn("ours"))
        finally:
            lock.finish("ours")

    thread = threading.Thread(target=ours, name="ours")
    thread.start()
    lock.wait_turn("bare")
    try:
        bare_loop(store, iterations, lambda: lock.yield_turn("bare"))
    finally:
        lock.finish("bare")
    thread.join()
    return {k: v[1:-1] for k, v in lock.spans.items()}


def child(args) -> int:
    with PeakRSS() as rss:
        if args.child == "bare":
            bare_loop(args.store, args.iterations)
        else:
            ours_loop(args.store, args.out, args.iterations)
    print(json.dumps({"base_mib": rss.base_mib, "peak_mib": rss.peak_mib}))
    return 0


def build_store(root: Path, num: int, slots: int, steps_per_slot: int) -> str:
    teacher = build_bench_teacher(root / "teacher")
    config = TrajectoriesConfig(prompts=str(prompt_store(root / "prompts", num)), teacher=str(teacher),
                                out=str(root / "store.zarr"), slots=slots, steps_per_slot=steps_per_slot,
                                device="cpu", batch_size=num)
    generate_trajectories(config, log=lambda _m: None)
    return config.out


def memory(kind: str, store: str, out: str, iterations: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--store", store, "--out", out,
           "--iterations", str(iterations), "--threads", str(threads)]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--num", type=int, default=6, help="trajectories in the store")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--steps-per-slot", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = build_store(root, args.num, args.slots, args.steps_per_slot)
        spans = lockstep_speed(store, str(root / "run"), args.iterations)
        for k, (b, o) in enumerate(zip(spans["bare"], spans["ours"]), start=2):
            print(f"  iteration {k}: bare {b[0]:.3f} s ({b[1]:.3f} CPU), ours {o[0]:.3f} s ({o[1]:.3f} CPU)", flush=True)
        mem = {k: memory(k, store, str(root / f"mem-{k}"), args.iterations, args.threads) for k in ("bare", "ours")}
    n = len(spans["bare"])
    (bw, bc), (ow, oc) = ([sum(x[i] for x in spans[k]) / n for i in (0, 1)] for k in ("bare", "ours"))
    print(f"machine: {machine()}")
    print(f"workload: bench UNet, N×M = {args.slots}×{args.steps_per_slot}, {args.num} trajectories, "
          f"rank 1, disc_channels {DISC_CHANNELS}, {n} timed iterations each, in turns")
    print(f"mean: bare {bw:.3f} s/iter ({bc:.3f} CPU), ours {ow:.3f} s/iter ({oc:.3f} CPU)")
    print(f"s/iteration ratio ours/bare = {ow / bw:.3f} wall, {oc / bc:.3f} thread CPU "
          f"(median per-iteration {np.median([o[0] / b[0] for b, o in zip(spans['bare'], spans['ours'])]):.3f}) "
          f"(target <= 1.05)")
    b, o = mem["bare"], mem["ours"]
    print(f"peak RSS during the loop: bare {b['peak_mib']:.0f} MiB (before {b['base_mib']:.0f}), "
          f"ours {o['peak_mib']:.0f} MiB (before {o['base_mib']:.0f})")
    print(f"peak memory ratio ours/bare = {o['peak_mib'] / b['peak_mib']:.3f}; growth over the pre-loop RSS "
          f"{(o['peak_mib'] - o['base_mib']) / max(b['peak_mib'] - b['base_mib'], 1e-9):.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
