"""Stage A's config: the options (what a pipeline sets per stage) and the wiring (paths, teacher,
seed, device: what a pipeline derives from its own fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rapm_core.config import Device, Precision, StrictModel
from rapm_core.execution import ExecutionConfig


class SlotOptions(StrictModel):
    """N, M and the guidance: what the teacher's trajectories are (and what a plan is asked)."""

    slots: int = Field(4, ge=1, le=50, description="N: coarse slots = student sampling steps")
    # M = 10 gives N·M = 40 teacher steps at N = 4, inside the step range where guided DDIM is
    # converged for SD-class teachers; every M ≤ 20 keeps the N-step grid inside the fine grid.
    steps_per_slot: int = Field(10, ge=1, le=100, description="M: teacher DDIM steps per slot (N·M in all)")
    # The stock SD pipelines' default, inside RAPM's SD-typical 4.5–8.
    guidance: float = Field(7.5, ge=1.0, description="teacher classifier-free guidance scale (1 = no CFG)")


class TrajectoriesOptions(SlotOptions):
    """How the teacher's trajectories are made and stored."""

    batch_size: int = Field(4, ge=1, description="prompts per teacher batch (speed only; not part of the store's identity)")
    dtype: Precision = Field("fp32", description="teacher compute dtype")
    store_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of stored positions (float16 halves the store; float32 is exact)")
    limit: int | None = Field(None, ge=1, description="use only the first LIMIT prompts of the split")
    # More noise draws of a small prompt set are new trajectories (RESULTS.md: what they bought on
    # the shapes teacher).
    samples_per_prompt: int = Field(1, ge=1, description="trajectories per prompt, each from its own noise")
    # The SD3 pipeline's own default; a teacher trained with fewer T5 tokens (the embedded flow
    # teacher: 16) is sampled with its own.
    max_sequence_length: int = Field(256, ge=1, le=4096, description="SD3-class teachers: T5 tokens per prompt, as "
                                     "the pipeline's max_sequence_length (without T5, that many zero tokens); "
                                     "UNet teachers ignore it")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig,
                                       description="where generation runs (speed only; same store everywhere)")


class TrajectoriesConfig(TrajectoriesOptions):
    """Stage A: the teacher's guided N·M-step DDIM trajectories for every prompt, all positions kept."""

    prompts: str = Field(description="prompt store directory (made by `rapm ingest`)")
    teacher: str = Field(description="teacher pipeline: local diffusers directory or hub id (SD1.5-, SDXL- or SD3-class)")
    out: str = Field(description="trajectory store (Zarr group) to create, or to resume if it has the same config")
    revision: str | None = Field(None, description="teacher revision (hub branch, tag or commit)")
    seed: int = Field(0, ge=0, description="global seed; trajectory i uses sha256(seed, i) as its noise seed")
    device: Device = Field("auto", description="compute device")
    split: Literal["train", "eval"] = Field("train", description="prompt split to generate for")
