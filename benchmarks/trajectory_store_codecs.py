"""Which Blosc setting to compress trajectory positions with: ratio and speed, measured.

Two kinds of data, one trajectory per chunk as in the store (N = 4, M = 10, 41 positions):
- "tiny-teacher": real trajectories of the random tiny SD 1.5 teacher (16×16 latents);
  with random weights they stay close to noise, the hard case.
- "smooth": the positions of an ideal DDIM trajectory, √ᾱ_k·x0 + √(1−ᾱ_k)·ε, towards a smooth
  x0 (bilinearly upsampled 8×8 noise) at SD 1.5's 64×64 latent size; real teachers' late
  positions look like this, the early ones like noise.

Run: ``.venv/bin/python benchmarks/trajectory_store_codecs.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from rapm_core.ode import SlotGrid
from rapm_core.ode.vp import alpha_bar, inference_scheduler
from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher
from rapm_testing.tiny_teacher import _scheduler as sd_scheduler, build_tiny_sd15
from rapm_core.trajectories.chain import initial_noise, teacher_trajectories, trajectory_seed

N, M, NUM = 4, 10, 8
# zstd-9 was measured too: ~1.3× like zstd-5/7 but at ~1 MiB/s, slower than generation on a GPU.
OPTIONS = [("zstd", lvl, sh) for lvl in (1, 3, 5, 7) for sh in ("noshuffle", "shuffle", "bitshuffle")]
OPTIONS += [("lz4", 5, sh) for sh in ("shuffle", "bitshuffle")]


def tiny_teacher_positions(workdir: str) -> np.ndarray:
    teacher = load_teacher(build_tiny_sd15(f"{workdir}/tiny-sd15"))
    grid = SlotGrid.from_scheduler(teacher.scheduler_config, N, M)
    prompts = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "triangle", "star")][:NUM]
    noise = initial_noise([trajectory_seed(0, i) for i in range(NUM)], teacher.latent_shape, torch.float32, "cpu")
    z = teacher_trajectories(teacher.unet, teacher.scheduler_config, grid, noise, encode_prompts(teacher, prompts),
                             encode_uncond(teacher), 7.5)
    return z.numpy()


def smooth_positions() -> np.ndarray:
    sched = inference_scheduler(sd_scheduler("epsilon").config, N * M)
    ac = sched.alphas_cumprod
    levels = [alpha_bar(ac, int(t)) for t in sched.timesteps] + [alpha_bar(ac, -1)]
    g = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.interpolate(torch.randn(NUM, 4, 8, 8, generator=g), size=64, mode="bilinear")
    eps = torch.randn(NUM, 4, 64, 64, generator=g)
    return torch.stack([a.sqrt() * x0 + (1 - a).sqrt() * eps for a in levels], dim=1).numpy()


def measure(data: np.ndarray, cname: str, clevel: int, shuffle: str) -> tuple[float, float]:
    """(compression ratio, write MiB/s) writing ``data`` one trajectory per chunk to a local store."""
    with tempfile.TemporaryDirectory() as path:
        arr = zarr.create_array(path, shape=data.shape, chunks=(1, *data.shape[1:]), dtype=data.dtype,
                                compressors=BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle))
        seconds = float("inf")
        for _ in range(3):  # best of 3: the machine is shared
            t0 = time.perf_counter()
            for i in range(len(data)):
                arr[i] = data[i]
            seconds = min(seconds, time.perf_counter() - t0)
        chunk_bytes = sum(f.stat().st_size for f in Path(path, "c").rglob("*") if f.is_file())
    return data.nbytes / chunk_bytes, data.nbytes / 2**20 / seconds


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        datasets = {"tiny-teacher": tiny_teacher_positions(workdir), "smooth": smooth_positions()}
    print("| data | dtype | codec | ratio | write MiB/s |")
    print("|---|---|---|---|---|")
    for name, data in datasets.items():
        for dtype in ("float16", "float32"):
            typed = data.astype(dtype)
            for cname, clevel, shuffle in OPTIONS:
                ratio, speed = measure(typed, cname, clevel, shuffle)
                print(f"| {name} {tuple(typed.shape[1:])} | {dtype} | {cname}-{clevel} {shuffle} | {ratio:.3f} | {speed:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
