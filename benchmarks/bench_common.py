"""Shared pieces of the speed benchmarks: the benchmark teacher, prompts, machine facts, medians.

The benchmark teacher is the tiny SD 1.5-class pipeline with a larger UNet (two levels, two
layers each, 1.4 M parameters): large enough that a UNet call is real work, small enough that
per-call overheads of the project's code (Python, hooks, stores) would show in a ratio. The
SD 1.5-sized config is the published SD 1.5 UNet's shape, for the CUDA memory benchmark.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from rapm_testing.tiny_teacher import TEXT_DIM, build_tiny_sd15
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

# The heaviest method (two discriminators on both positions): what the speed and memory benchmarks
# measure, whatever the default loss kinds are.
ADVERSARIAL = dict(loss_relative="adversarial", loss_absolute="adversarial")

BENCH_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
)
# SD 1.5's UNet (860 M parameters, 64×64 latents, 768-d text); diffusers' defaults otherwise.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
TINY_UNET = dict(
    block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8,
)


def build_bench_teacher(directory: str | Path, unet_config: dict = BENCH_UNET, seed: int = 0) -> Path:
    """A stock SD 1.5-class pipeline directory (tiny text encoder and VAE) with the given UNet."""
    directory = Path(directory)
    build_tiny_sd15(directory, seed=seed)
    pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(seed)
    pipe.register_modules(unet=UNet2DConditionModel(**unet_config))
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def prompt_store(directory: str | Path, num: int, split: str = "train") -> Path:
    texts = [f"a {c} shape number {i}" for i, c in enumerate(["red", "green", "blue", "yellow"] * num)][:num]
    write_prompt_store(directory, [PromptRecord(prompt_id(t), t, split) for t in texts])
    return Path(directory)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, {device}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load avg {load:.1f}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class Timer:
    """Wall seconds, this process's CPU seconds (all threads) and the calling thread's CPU
    seconds of a block; ``cpu - thread_cpu`` is what other threads (e.g. a writer) spent."""

    def __enter__(self) -> "Timer":
        self.t0, self.c0, self.tc0 = time.perf_counter(), time.process_time(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.thread_cpu = time.thread_time() - self.tc0


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 5 ms (RSS before
    the block in ``base_mib``, the peak in ``peak_mib``). ``ru_maxrss`` would also count the
    import-time peak, which can hide a small model's training entirely."""

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.base_mib = self.peak_mib = self._proc.memory_info().rss / 2**20
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)


class Lockstep:
    """Two loops in two threads taking turns, one iteration each, so that a busy spell on a
    shared machine slows both alike; each side's iteration spans (wall, thread CPU) are kept.

    A side calls ``wait_turn(me)`` before its loop and ``yield_turn(me)`` after every iteration;
    ``finish(me)`` when it leaves (also on error), after which the other side never waits.
    A span runs from a side's resumption to its next yield: its own work only.
    """

    def __init__(self, first: str, second: str):
        self._cv = threading.Condition()
        self._other = {first: second, second: first}
        self._turn = first
        self._done: set[str] = set()
        self._resumed: dict[str, tuple[float, float]] = {}
        self.spans: dict[str, list[tuple[float, float]]] = {first: [], second: []}

    def wait_turn(self, me: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == me or self._other[me] in self._done)
        self._resumed[me] = (time.perf_counter(), time.thread_time())

    def yield_turn(self, me: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        w0, c0 = self._resumed[me]
        self.spans[me].append((wall - w0, cpu - c0))
        with self._cv:
            self._turn = self._other[me]
            self._cv.notify_all()
        self.wait_turn(me)

    def finish(self, me: str) -> None:
        with self._cv:
            self._done.add(me)
            self._turn = self._other[me]
            self._cv.notify_all()
