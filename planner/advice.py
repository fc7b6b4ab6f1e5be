"""What to change when a stage does not fit: the least invasive setting that does, re-measured.

Candidates go from what changes nothing the stage computes to what changes the method:
a smaller batch (trajectories and evaluation), gradient checkpointing (distillation: the same
gradients, one more forward), bf16 (numerics; for distillation ``--weights-dtype bf16``, the
frozen weights alone), and last, for an adversarial method, pointwise losses. When none fits a
stage that loads an SD3-class teacher's T5-XXL, the same teacher saved without T5 is tried (no
flag does that: the user saves such a teacher). Every candidate is planned again on meta
tensors, so the advice's peak is a measurement of that setting, not an extrapolation.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterator

from planner.architecture import Architecture
from planner.config import PlanConfig, pointwise_instead, with_options
from planner.stages import STAGES, StageEstimate

GiB = 2 ** 30


def with_changes(config: PlanConfig, changes: dict[str, Any]) -> PlanConfig:
    """``config`` with options changed: the planner's own, or ``rapm distill``'s method options."""
    top = {k: v for k, v in changes.items() if k in PlanConfig.model_fields}
    method = {k: v for k, v in changes.items() if k not in top}
    return config.model_copy(update={**top, "method": with_options(config.method, **method) if method
                                     else config.method})


def flags(changes: dict[str, Any]) -> str:
    """The ``rapm plan`` options that make ``changes`` (method options are ``rapm distill``'s too)."""
    parts = []
    for key, value in changes.items():
        flag = key.replace("_", "-")
        parts.append(f"--{flag}" if value is True else f"--no-{flag}" if value is False else f"--{flag} {value}")
    return " ".join(parts)


def _candidates(stage: str, config: PlanConfig) -> Iterator[dict[str, Any]]:
    if stage == "distill":
        method = config.distill_method()
        low = [{}] if method.training.weights_dtype != "fp32" else [{}, {"weights_dtype": "bf16"}]
        ckpt = [{}] if method.training.gradient_checkpointing else [{}, {"gradient_checkpointing": True}]
        losses = [{}, pointwise_instead(method)] if method.trains_discriminators else [{}]
        for loss in losses:
            for precision in low:
                for checkpointing in ckpt:
                    change = {**precision, **checkpointing, **loss}
                    if change:
                        yield change
    else:
        for precision in ([{}] if config.precision != "fp32" else [{}, {"precision": "bf16"}]):
            yield {**precision, "batch_size": "search"}


def _fits(estimate: StageEstimate, limit: int) -> bool:
    return estimate.peak_bytes <= limit


def _batch(config: PlanConfig, stage: str) -> int:
    return config.trajectory_batch if stage == "trajectories" else config.eval_batch


def _largest_batch(run: Callable[[PlanConfig], StageEstimate], stage: str, config: PlanConfig, limit: int,
                   at_current: StageEstimate | None = None) -> tuple[PlanConfig, StageEstimate] | None:
    """The largest batch that fits, from the peaks at batch 1 and the current batch (memory is
    affine in the batch), confirmed by planning it."""
    current = _batch(config, stage)
    one_cfg = config.model_copy(update={"batch_size": 1})
    at_one = at_current if current == 1 and at_current else run(one_cfg)
    if not _fits(at_one, limit):
        return None
    at_current = at_current or run(config)
    if _fits(at_current, limit):
        return config, at_current
    slope = (at_current.peak_bytes - at_one.peak_bytes) / (current - 1)
    batch = min(current - 1, 1 + int((limit - at_one.peak_bytes) // max(slope, 1)))
    while batch > 1:
        cfg = config.model_copy(update={"batch_size": batch})
        est = run(cfg)
        if _fits(est, limit):
            return cfg, est
        batch -= 1
    return one_cfg, at_one


def advise(stage: str, arch: Architecture, config: PlanConfig, estimate: StageEstimate, limit: int) -> dict:
    """The first candidate setting under which ``stage`` fits ``limit`` bytes, or why none does
    (``estimate`` is the stage's plan under ``config``, which does not fit)."""
    def run(cfg: PlanConfig) -> StageEstimate:
        return STAGES[stage](arch, cfg)

    tried = []
    for change in _candidates(stage, config):
        searched = change.pop("batch_size", None) == "search"
        cfg = with_changes(config, change)
        if searched:
            found = _largest_batch(run, stage, cfg, limit, estimate if not change else None)
            if found is None:
                tried.append(flags({**change, "batch_size": 1}))
                continue
            cfg, est = found
            if cfg.batch_size is not None and cfg.batch_size != config.batch_size:
                change["batch_size"] = cfg.batch_size
        else:
            est = run(cfg)
        if _fits(est, limit) and change:
            return {"changes": change, "flags": flags(change), "peak_bytes": est.peak_bytes}
        tried.append(flags(change))
    return {"changes": None, "flags": None, "peak_bytes": None,
            "message": f"nothing tried fits {limit / GiB:.1f} GiB (tried: {'; '.join(t for t in tried if t)}); "
                       f"{_without_t5(stage, arch, config, limit)}a larger GPU or a lower --resolution"}


def _without_t5(stage: str, arch: Architecture, config: PlanConfig, limit: int) -> str:
    """For a stage that loads an SD3-class teacher's T5-XXL: whether the same teacher saved without
    T5 (the pipeline then puts zeros in its tokens' place) fits at batch 1, planned again."""
    if stage == "distill" or not arch.has_t5:
        return ""
    change = {"batch_size": 1, **({"precision": "bf16"} if config.precision == "fp32" else {})}
    est = STAGES[stage](replace(arch, text_encoders=arch.clip_encoders), with_changes(config, change))
    if not _fits(est, limit):
        return ""
    return (f"a teacher saved without T5 (text_encoder_3=None) fits with {flags(change)} "
            f"({est.peak_bytes / GiB:.2f} GiB); ")
