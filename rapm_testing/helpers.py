"""What the tests share that is not a fixture: constants, pure builders of in-memory objects, and the
helpers that drive a ``rapm`` command in a child process.

Fixtures (tests/conftest.py) hold what is built on disk once and shared: teachers, stores, runs,
CLIP, feature networks. What is here is called where a fixture cannot be: at import time (in
``parametrize`` lists and module constants), inside the test modules' own helper functions,
with other arguments at each call, or in a child process (``without_dac_override`` is a
``preexec_fn``). It lives in this package, not beside the tests, so that a test imports it by its
package name like any other module.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import DistillRunConfig, MethodConfig
from rapm_core.distill.method import Example
from rapm_core.distill.trainer import Trainer
from rapm_core.ode import SlotGrid
from rapm_core.sampler import ode_sample
from rapm_shapes.shapes import all_prompts

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose code a child ``rapm`` runs
EVAL_PROMPTS = all_prompts()[::7][:12]  # shapes captions, so a shapes evaluator can judge them


# -- distillation: a teacher's UNet, conditioning, trajectories, trainers ---------------------------
LATENT = (1, 4, 16, 16)


def is_sd3_dir(teacher_dir) -> bool:
    return (Path(teacher_dir) / "transformer").is_dir()


def load_unet(teacher_dir) -> UNet2DConditionModel | SD3Transformer2DModel:
    """The teacher's denoiser: its UNet, or an SD3-class teacher's transformer."""
    if is_sd3_dir(teacher_dir):
        return SD3Transformer2DModel.from_pretrained(teacher_dir, subfolder="transformer")
    return UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")


def perturb_unet_weights(teacher_dir) -> None:
    """Other weights at the same path, as a retrained or overwritten teacher would leave."""
    unet = load_unet(teacher_dir)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.01)
    unet.save_pretrained(teacher_dir / "unet")


def scheduler_config(teacher_dir):
    """The teacher's scheduler config as saved (any scheduler class: the file is the same)."""
    return DDIMScheduler.load_config(teacher_dir, subfolder="scheduler")


def latent_of(unet) -> tuple[int, int, int, int]:
    """One latent of the tiny teachers' 16×16 size, with the denoiser's channel count."""
    return (1, unet.config.in_channels, *LATENT[2:])


def random_cond(unet, seed: int = 0, tokens: int = 8) -> Conditioning:
    """Content is irrelevant to the math; SDXL's time ids are those of a 32×32 image (16² latents)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(unet, SD3Transformer2DModel):  # joint text tokens and the pooled projection
        return Conditioning(torch.randn(1, tokens, unet.config.joint_attention_dim, generator=g),
                            torch.randn(1, unet.config.pooled_projection_dim, generator=g))
    embeds = torch.randn(1, tokens, unet.config.cross_attention_dim, generator=g)
    if unet.config.addition_embed_type != "text_time":
        return Conditioning(embeds)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return Conditioning(embeds, torch.randn(1, pooled_dim, generator=g), torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]))


def teacher_trajectory(teacher_dir, grid: SlotGrid, seed: int = 0) -> Example:
    """Z with every fine position (K+1, C, H, W) from the shared sampler on the teacher's ODE, guidance 1."""
    unet = load_unet(teacher_dir)
    cond = random_cond(unet, seed)
    noise = torch.randn(latent_of(unet), generator=torch.Generator().manual_seed(seed + 100))
    positions = ode_sample(unet, scheduler_config(teacher_dir), noise, cond, grid.total_steps, return_positions=True)[0]
    return Example(positions=positions, cond=cond, index=seed)


def method_config(**overrides) -> MethodConfig:
    """Small heads keep CPU tests fast. Both RAPM losses are adversarial unless overridden: the
    two discriminators are the path with the most to check."""
    return MethodConfig.from_options(**{"disc_channels": 16, "loss_relative": "adversarial",
                                        "loss_absolute": "adversarial", **overrides})


def make_distiller(teacher_dir, grid: SlotGrid, **overrides) -> Trainer:
    """A trainer on a freshly loaded teacher (see ``method_config`` for the defaults)."""
    return Trainer(load_unet(teacher_dir), scheduler_config(teacher_dir), grid, method_config(**overrides))


def grid_for(teacher_dir, n: int, m: int) -> SlotGrid:
    return SlotGrid.from_scheduler(scheduler_config(teacher_dir), n, m)


def run_config(store: Path, out: Path, **overrides) -> DistillRunConfig:
    """Small heads and a big learning rate: a CPU run of a few iterations still moves the weights."""
    method = method_config(**{"disc_channels": 8, "lr": 1e-2, "lr_disc": 1e-2, "loss_relative": "both",
                              "loss_absolute": "both", **overrides.pop("method", {})})
    run = {"iterations": 8, "checkpoint_every": 2, "keep_checkpoints": 2, "seed": 3, "device": "cpu", **overrides}
    return DistillRunConfig(trajectories=str(store), out=str(out), **dict(method), **run)


# -- evaluation ---------------------------------------------------------------------------------------
class TinyFeatures(nn.Module):
    """A fixed random conv feature network over uint8 images, standing in for Inception."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 127.5 - 1)


# -- a ``rapm`` command in a child process, and its processes through /proc ---------------------------
def rapm_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """A ``rapm`` command's environment without a Prefect server: it runs its flows directly."""
    Path(prefect_home).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def start_rapm(args: list[str], env: dict, logs: Path, **popen) -> subprocess.Popen:
    """``rapm ARGS`` as a terminal's foreground job: its own process group, output to files
    (a pipe would keep a test waiting on any process that inherited it)."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                            stdout=open(logs / "stdout", "w"), stderr=open(logs / "stderr", "w"),
                            start_new_session=True, **popen)


def run_rapm(args: list[str], env: dict, logs: Path, timeout: float = 300, **popen) -> tuple[int, str, str]:
    proc = start_rapm(args, env, logs, **popen)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its whole group, whatever it started there
            proc.wait()
    return code, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def wait_until(ready: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except FileNotFoundError:
        pass
    return found


def session_processes(sid: int) -> list[int]:
    """Running processes of session ``sid`` (a command started with ``start_rapm`` leads its own):
    once the command is gone, any of them is an orphan it left behind."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has stopped running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1


def without_dac_override() -> None:
    # preexec_fn: root writes into a mode-555 directory anyway; without CAP_DAC_OVERRIDE (dropped
    # from the bounding set, so gone after exec) it is refused as it is for everyone else.
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def load_benchmark(script: str, name: str) -> types.ModuleType:
    """``benchmarks/<script>`` imported as module ``name`` (the benchmarks are scripts, not a
    package: their directory goes on the path for their sibling imports)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
