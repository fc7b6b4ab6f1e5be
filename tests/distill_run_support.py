"""Builders shared by the distill-flow tests: a tiny real trajectory store, made by the
trajectories stage's own plain function from a real prompt store, and a cheap run config."""

from __future__ import annotations

from pathlib import Path

from rapm_core.distill.config import DistillRunConfig, MethodConfig
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

PROMPTS = ["a red circle", "two blue squares", "a green triangle on grey"]


def make_store(root: Path, teacher_dir: Path, num: int = 3, slots: int = 2, steps_per_slot: int = 2,
               prompts: list[str] | None = None, **options) -> Path:
    texts = (prompts or PROMPTS)[:num]
    prompts = root / "prompts"
    write_prompt_store(prompts, [PromptRecord(prompt_id(t), t) for t in texts])
    out = root / "trajectories.zarr"
    generate_trajectories(TrajectoriesConfig(
        prompts=str(prompts), teacher=str(teacher_dir), out=str(out), slots=slots, steps_per_slot=steps_per_slot,
        guidance=3.0, device="cpu", batch_size=num, store_dtype="float32", **options), log=lambda _: None)
    return out


def run_config(store: Path, out: Path, **overrides) -> DistillRunConfig:
    """Small heads and a big learning rate: a CPU run of a few iterations still moves the weights."""
    method = MethodConfig.from_options(**{"disc_channels": 8, "lr": 1e-2, "lr_disc": 1e-2, "loss_relative": "both",
                                          "loss_absolute": "both", **overrides.pop("method", {})})
    run = {"iterations": 8, "checkpoint_every": 2, "keep_checkpoints": 2, "seed": 3, "device": "cpu", **overrides}
    return DistillRunConfig(trajectories=str(store), out=str(out), **dict(method), **run)
