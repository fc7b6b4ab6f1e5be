"""What ``rapm plan`` is asked: a teacher architecture, the stages' settings, the method's options.

The method is ``rapm distill``'s own ``MethodConfig`` (its sections and flags: ``--method``,
``--loss-relative``, ``--rank``, ``--weights-dtype``, ``--pcm-adversarial``, …), so a plan takes
exactly the options of the run it plans. ``--precision`` is the trajectories' and the
evaluation's compute dtype (``rapm trajectories --dtype``; the evaluation computes in the
store's) and, unless ``--weights-dtype`` is given, the dtype of distillation's frozen weights
too; LoRA parameters, discriminator heads and their AdamW states stay fp32 as in the engine.
Meta tensors have no autocast: ``--mixed-precision`` is planned as compute in that dtype next to
the fp32 weights (see ``stages.distill``).
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, Field

from rapm_core.config import FrozenModel, Precision
# The stage configs themselves, not through planner.engine: ``rapm plan --help`` builds its
# options from this module, and the engine brings torch, diffusers and peft.
from rapm_core.distill.config import MethodConfig
from rapm_core.evaluate.config import EvaluateOptions
from rapm_core.trajectories.config import SlotOptions, TrajectoriesOptions
from planner.presets import PRESETS


# The stages' own defaults.
TRAJECTORY_BATCH = TrajectoriesOptions.model_fields["batch_size"].default
EVAL_BATCH = EvaluateOptions.model_fields["batch_size"].default
EVAL_IMAGES = EvaluateOptions.model_fields["num_images"].default
FIGURE_ROWS = EvaluateOptions.model_fields["trajectory_rows"].default
_SECTIONS = tuple(name for name, f in MethodConfig.model_fields.items()
                  if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))


def given_options(method: MethodConfig) -> dict[str, Any]:
    """The options that were set on ``method``, named as on the command line (flat)."""
    options = {k: getattr(method, k) for k in method.model_fields_set if k not in _SECTIONS}
    for name in _SECTIONS:
        section = getattr(method, name)
        options.update({k: getattr(section, k) for k in section.model_fields_set})
    return options


def with_options(method: MethodConfig, **changes: Any) -> MethodConfig:
    """``method`` with some command-line options changed, validated as ``rapm distill`` would."""
    return MethodConfig.from_options(**{**given_options(method), **changes})


def pointwise_instead(method: MethodConfig) -> dict[str, Any]:
    """The options that turn ``method``'s adversarial terms into pointwise ones (empty if none)."""
    if method.method == "pcm":
        return {"pcm_adversarial": False} if method.pcm.pcm_adversarial else {}
    if method.method != "rapm":
        return {}
    swap = {"adversarial": "pointwise", "both": "pointwise"}
    return {key: swap[getattr(method.rapm, key)] for key in ("loss_relative", "loss_absolute")
            if getattr(method.rapm, key) in swap}


class PlanConfig(FrozenModel, SlotOptions):
    """Predict each stage's peak accelerator memory (and the paper recipe's wall time) without weights or a GPU."""

    # N, M and the guidance are the trajectories' own options (SlotOptions): same flags, bounds and defaults.

    teacher: str | None = Field(None, description="local diffusers directory or hub id: only its config files are read")
    preset: str | None = Field(None, description=f"published architecture instead of a teacher: {', '.join(PRESETS)}")
    # Far above any SD-class model's use; past it the plan's numbers overflow what they describe.
    resolution: int | None = Field(None, ge=8, le=16384,
                                   description="image side in pixels (default: the teacher's native one)")
    batch_size: int | None = Field(
        None, ge=1, description=f"prompts per trajectory batch and images per eval batch "
                                f"(default: the stages' own, {TRAJECTORY_BATCH} and {EVAL_BATCH})")
    precision: Precision = Field(
        "fp32", description="compute dtype of trajectories and evaluation (rapm trajectories --dtype), and of "
                            "distillation's frozen weights unless --weights-dtype is given")
    attention: Literal["efficient", "math"] = Field(
        "efficient", description="efficient: fused SDPA as CUDA's flash/memory-efficient kernels; "
                                 "math: full attention matrices (an upper bound)")
    gpu_memory: float | None = Field(None, gt=0, description="accelerator memory in GiB (as nvidia-smi's MiB / 1024): "
                                                             "say what fits and what to change")
    reserve: float = Field(1.0, ge=0, validate_default=True,
                           description="GiB kept free of tensors for the CUDA context and the allocator's "
                                       "fragmentation")
    seconds_per_call: float | None = Field(
        None, gt=0, description="measured seconds of one teacher denoiser (UNet or SD3 transformer) forward at "
                                "batch 1 at this resolution and precision (benchmarks/gpu_check.py prints it); "
                                "default: an assumed A6000 rate")
    trajectories: int = Field(1000, ge=1, description="trajectories of the recipe to time (the paper's 1000)")
    iterations: int = Field(20000, ge=1, description="distillation iterations of the recipe to time (the paper's 20K)")
    eval_images: int = Field(EVAL_IMAGES, ge=2, description="images per method in the evaluate stage")
    # rapm trajectories' own option: the stored prompt embeddings' length depends on it.
    max_sequence_length: int = TrajectoriesOptions.model_fields["max_sequence_length"]
    method: MethodConfig = Field(default_factory=MethodConfig,
                                 description="the distillation method, as `rapm distill` takes it")

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

    def distill_method(self) -> MethodConfig:
        """The method config `rapm distill` runs for this plan: ``--weights-dtype`` follows
        ``--precision`` unless given, and fp16 weights bring fp16 mixed precision (the engine
        refuses them without its loss scaling)."""
        training = self.method.training
        if "weights_dtype" in training.model_fields_set:
            return self.method
        changes: dict[str, Any] = {"weights_dtype": self.precision}
        if self.precision == "fp16" and training.mixed_precision == "no":
            changes["mixed_precision"] = "fp16"
        return with_options(self.method, **changes)

    @property
    def trajectory_batch(self) -> int:
        return self.batch_size or TRAJECTORY_BATCH

    @property
    def eval_batch(self) -> int:
        return min(self.batch_size or EVAL_BATCH, self.eval_images)
