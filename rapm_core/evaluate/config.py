"""Stage C's config: the options (what a pipeline sets per stage) and the wiring (run dir, stores,
seed, device: what a pipeline derives from its own fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rapm_core.config import Device, StrictModel
from rapm_core.execution import ExecutionConfig

SAMPLERS = ("teacher_ref", "teacher_ddim", "dpm_solver", "student")
REFERENCE = "teacher_ref"
EVAL_DIR = "eval"  # the evaluation's directory inside a run dir
Sampler = Literal["teacher_ref", "teacher_ddim", "dpm_solver", "student"]


class EvaluateOptions(StrictModel):
    """What is sampled and measured."""

    num_images: int = Field(64, ge=2, description="images per sampler; the eval prompts repeat with fresh noise if fewer")
    samplers: list[Sampler] = Field(list(SAMPLERS), description=f"samplers to run ({', '.join(SAMPLERS)}); "
                                                                f"{REFERENCE} is always run: it is the fidelity reference")
    batch_size: int = Field(16, ge=1, description="images per sampling batch (speed only)")
    evaluator: str = Field("auto", description="shapes evaluator dir for domain FID and prompt adherence; "
                                               "auto: the embedded one when every prompt is a shapes caption; none: off")
    render_seed: int = Field(0, description="seed of the real renders domain FID compares with")
    fid_weights: str | None = Field(None, description="Inception FID feature network: torch-fidelity's Inception "
                                                      "weights (.pth) or a torch.export'ed network (.pt2)")
    fid_reference: str | None = Field(None, description="real side of Inception FID: a folder of real images (its "
                                                        "statistics are computed once) or an .npz of mu/sigma "
                                                        f"(`rapm fid-stats`; default: the {REFERENCE} images)")
    clip_model: str | None = Field(None, description="local CLIPModel directory for CLIP score")
    grid_rows: int = Field(6, ge=1, description="prompts shown in grid.png")
    trajectory_rows: int = Field(3, ge=1, description="stored trajectories shown in trajectory.png")
    feature_store: str | None = Field(None, description="Zarr store (path or fsspec URL) of per-image features, "
                                                        "written batch by batch: a re-run resumes it and --backend "
                                                        "shards it; for the paper's 30K images (default: off, every "
                                                        "image in memory)")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig,
                                       description="where --feature-store sampling runs (speed only: same store "
                                                   "everywhere)")
    publish: str | None = Field(None, description="also copy the finished eval dir here, e.g. s3://bucket/reports/run1 "
                                                  "(endpoint and keys from the environment)")

    @model_validator(mode="after")
    def _sharding_needs_a_store(self) -> "EvaluateOptions":
        # Shards hand their results over through the store; without one there is nothing to shard.
        if self.execution.backend != "in-process" and self.feature_store is None:
            raise ValueError("--backend other than in-process needs --feature-store")
        return self

    @field_validator("samplers")
    @classmethod
    def _reference_first(cls, samplers: list[str]) -> list[str]:
        return [REFERENCE] + [m for m in SAMPLERS if m in samplers and m != REFERENCE]


class EvaluateConfig(EvaluateOptions):
    """Stage C: sample the eval prompts with every sampler from the same noise and measure them."""

    run: str = Field(description="run dir made by `rapm distill` (its export/ is the student)")
    trajectories: str | None = Field(None, description="trajectory store the run was distilled from "
                                                       "(default: the one run.json names)")
    prompts: str | None = Field(None, description="prompt store whose eval split is sampled "
                                                  "(default: the one the trajectory store was made from)")
    seed: int = Field(0, ge=0, description="noise seed: image i gets sha256(seed, i), the same for every sampler")
    device: Device = Field("auto", description="compute device")
