"""Peak memory of one RAPM training step with and without gradient checkpointing.

On CUDA the UNet is SD 1.5-sized (bench_common.SD15_UNET: 860 M parameters, 64×64 latents,
77×768 text embeddings), random weights in bf16 (or --dtype fp16/fp32) with autocast, and the
peak is ``torch.cuda.max_memory_allocated``: the number that decides whether RAPM fits one
consumer GPU at batch size 1. On a CPU the same script runs the tiny UNet (fp32) and the peak
is the process's sampled RSS growth; that checks the script, not SD 1.5's numbers. Each setting
runs in a fresh subprocess: two warm-up steps, then three timed ones (default method, N = 4,
M = 2, rank 1); checkpointing covers the student's UNet call (the discriminator's backbone
runs unchecked, see rapm_core.distill.discriminator).

Run: ``.venv/bin/python benchmarks/bench_memory_checkpointing.py [--config auto|tiny|sd15] [--dtype bf16]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from bench_common import ADVERSARIAL, SD15_UNET, TINY_UNET, PeakRSS, machine
from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.method import Example
from rapm_core.distill.trainer import Trainer
from rapm_core.ode import SlotGrid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def scheduler_config() -> dict:
    return dict(DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config)


def step_once(config_name: str, checkpointing: bool, dtype_name: str) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    unet_config = SD15_UNET if config_name == "sd15" else TINY_UNET
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config).to(device, dtype)
    size, text = unet.config.sample_size, unet.config.cross_attention_dim
    grid = SlotGrid.from_scheduler(scheduler_config(), 4, 2)
    mixed = "no" if dtype == torch.float32 or not cuda else dtype_name
    method = MethodConfig.from_options(gradient_checkpointing=checkpointing, mixed_precision=mixed, **ADVERSARIAL)
    distiller = Trainer(unet, scheduler_config(), grid, method, device=device)
    gen = torch.Generator().manual_seed(0)
    example = Example(torch.randn(grid.total_steps + 1, 4, size, size, generator=gen),
                      Conditioning(torch.randn(1, 77 if config_name == "sd15" else 16, text, generator=gen)), 0)
    for _ in range(2):
        distiller.train_step(example, gen)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for _ in range(3):
            distiller.train_step(example, gen)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / 3
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak_mib - rss.base_mib
    return {"peak_mib": peak, "seconds_per_iteration": seconds,
            "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "device": str(device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["auto", "tiny", "sd15"], default="auto")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="UNet weights (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    config = args.config if args.config != "auto" else ("sd15" if cuda else "tiny")
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.child:
        print(json.dumps(step_once(config, args.child == "on", dtype)))
        return 0
    results = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--config", config, "--dtype", dtype, "--threads", str(args.threads),
               "--child", mode]
        results[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    off, on = results["off"], results["on"]
    what = "CUDA max_memory_allocated" if cuda else "RSS growth during the steps"
    print(f"machine: {machine()}")
    print(f"UNet: {config} ({off['params_m']:.1f} M params), {dtype}, N×M = 4×2, rank 1, batch 1, on {off['device']}")
    print(f"peak ({what}): without checkpointing {off['peak_mib']:.0f} MiB, with {on['peak_mib']:.0f} MiB "
          f"→ ratio {on['peak_mib'] / off['peak_mib']:.3f}")
    print(f"s/iteration: without {off['seconds_per_iteration']:.3f}, with {on['seconds_per_iteration']:.3f} "
          f"→ ratio {on['seconds_per_iteration'] / off['seconds_per_iteration']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
