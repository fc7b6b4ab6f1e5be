"""What ``rapm plan`` is asked: a teacher architecture, the stages' settings, the method's options.

The method options mirror ``rapm_core.distill.DistillConfig`` name for name (so ``rapm plan``
takes the same flags as ``rapm distill``) and take their defaults from it (through
``rapm_core.plan.engine``, the planner's one import seam for the method's code).
``precision`` replaces DistillConfig's ``mixed_precision`` for every stage at once: frozen
weights are stored in it and activations computed in it, while LoRA parameters,
discriminator heads and their AdamW states stay fp32 (meta tensors have no autocast, so the
planner makes tensors in the target dtype instead).
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from rapm_core.plan.engine import DistillConfig
from rapm_core.plan.presets import PRESETS

Precision = Literal["fp32", "bf16", "fp16"]
LossMode = Literal["adversarial", "pointwise", "both", "off"]
_DISTILL = DistillConfig.model_fields

# The stages' own defaults (flows.trajectories.TrajectoriesConfig, flows.evaluate.EvaluateConfig);
# tests/test_plan.py checks they still agree.
TRAJECTORY_BATCH = 4
EVAL_BATCH = 16
EVAL_IMAGES = 64
TRAJECTORY_ROWS = 3


def _default(name: str):
    return _DISTILL[name].default


class PlanMethod(BaseModel):
    """The distillation method and the options of it that change memory or time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["rapm", "pcm", "lcm"] = Field(
        "rapm", description="rapm (N student jumps per iteration), or a peer as PEERS.md states it: pcm or lcm "
                            "(one student fwd+bwd, a guided teacher step, a no-grad target call)")
    rank: int = Field(_default("rank"), ge=1, description=_DISTILL["rank"].description)
    loss_relative: LossMode = Field(_default("loss_relative"), description=_DISTILL["loss_relative"].description)
    loss_absolute: LossMode = Field(
        _default("loss_absolute"), validate_default=True,
        description=_DISTILL["loss_absolute"].description + "; pcm/lcm: their one loss at the phase end")
    slots_per_iteration: Literal["all", "random"] = Field(
        _default("slots_per_iteration"), description=_DISTILL["slots_per_iteration"].description)
    disc_channels: int = Field(_default("disc_channels"), ge=1, description=_DISTILL["disc_channels"].description)
    gradient_checkpointing: bool = Field(
        _default("gradient_checkpointing"), description=_DISTILL["gradient_checkpointing"].description)

    # Cross-field checks sit on the later field, so an error names the option to change.
    @pydantic.field_validator("loss_absolute")
    @classmethod
    def _check_losses(cls, loss_absolute: str, info: pydantic.ValidationInfo) -> str:
        method, loss_relative = info.data.get("method"), info.data.get("loss_relative")
        if method == "rapm" and loss_relative == loss_absolute == "off":
            raise ValueError("loss_relative and loss_absolute are both 'off': nothing to train")
        if method in ("pcm", "lcm") and loss_absolute == "off":
            raise ValueError(f"{method} has one loss, --loss-absolute; it cannot be 'off'")
        if method == "lcm" and loss_absolute != "pointwise":
            raise ValueError("lcm's loss is pointwise only (PEERS.md); use --method pcm for an adversarial peer")
        return loss_absolute

    def distill_config(self) -> DistillConfig:
        """The real method config the planner runs (mixed precision is emulated by dtype, see module doc)."""
        return DistillConfig(rank=self.rank, loss_relative=self.loss_relative, loss_absolute=self.loss_absolute,
                             slots_per_iteration=self.slots_per_iteration, disc_channels=self.disc_channels,
                             gradient_checkpointing=self.gradient_checkpointing)

    @property
    def adversarial(self) -> bool:
        if self.method == "rapm":
            return self.distill_config().adversarial("rel") or self.distill_config().adversarial("abs")
        return self.loss_absolute in ("adversarial", "both")


class PlanConfig(BaseModel):
    """Predict each stage's peak accelerator memory (and the paper recipe's wall time) without weights or a GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: str | None = Field(None, description="local diffusers directory or hub id: only its config files are read")
    preset: str | None = Field(None, description=f"published architecture instead of a teacher: {', '.join(PRESETS)}")
    resolution: int | None = Field(None, ge=8, description="image side in pixels (default: the teacher's native one)")
    slots: int = Field(4, ge=1, le=50, description="N: slots = student steps")
    steps_per_slot: int = Field(10, ge=1, le=100, description="M: teacher DDIM steps per slot")
    guidance: float = Field(7.5, ge=1.0, description="teacher CFG scale; > 1 doubles the teacher's UNet batch")
    batch_size: int | None = Field(
        None, ge=1, description=f"prompts per trajectory batch and images per eval batch "
                                f"(default: the stages' own, {TRAJECTORY_BATCH} and {EVAL_BATCH})")
    precision: Precision = Field("fp32", description="weights and activations of every stage "
                                                     "(LoRA, heads and AdamW states stay fp32)")
    attention: Literal["efficient", "math"] = Field(
        "efficient", description="efficient: fused SDPA as CUDA's flash/memory-efficient kernels; "
                                 "math: full attention matrices (an upper bound)")
    gpu_memory: float | None = Field(None, gt=0, description="accelerator memory in GiB (as nvidia-smi's MiB / 1024): "
                                                             "say what fits and what to change")
    reserve: float = Field(1.0, ge=0, validate_default=True,
                           description="GiB kept free of tensors for the CUDA context and the allocator's "
                                       "fragmentation")
    seconds_per_call: float | None = Field(
        None, gt=0, description="measured seconds of one teacher UNet forward at batch 1 at this resolution and "
                                "precision (benchmarks/gpu_check.py prints it); default: an assumed A6000 rate")
    trajectories: int = Field(1000, ge=1, description="trajectories of the recipe to time (the paper's 1000)")
    iterations: int = Field(20000, ge=1, description="distillation iterations of the recipe to time (the paper's 20K)")
    eval_images: int = Field(EVAL_IMAGES, ge=2, description="images per method in the evaluate stage")
    trajectory_rows: int = Field(TRAJECTORY_ROWS, ge=1, description="stored trajectories in the evaluate stage's "
                                                                    "figure, decoded at once: rows × (N+1) latents")
    method: PlanMethod = Field(default_factory=PlanMethod, description="the distillation method")

    @pydantic.field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        return name

    @pydantic.field_validator("reserve")
    @classmethod
    def _room_left(cls, reserve: float, info: pydantic.ValidationInfo) -> float:
        gpu = info.data.get("gpu_memory")
        if gpu is not None and gpu <= reserve:
            raise ValueError(f"--gpu-memory {gpu:g} GiB leaves nothing after --reserve {reserve:g} GiB")
        return reserve

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> "PlanConfig":
        if (self.teacher is None) == (self.preset is None):
            raise ValueError("give exactly one of --teacher DIR_OR_ID and --preset NAME")
        return self

    @property
    def trajectory_batch(self) -> int:
        return self.batch_size or TRAJECTORY_BATCH

    @property
    def eval_batch(self) -> int:
        return min(self.batch_size or EVAL_BATCH, self.eval_images)
