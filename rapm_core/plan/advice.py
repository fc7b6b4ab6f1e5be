"""What to change when a stage does not fit: the least invasive setting that does, re-measured.

Candidates go from what changes nothing the stage computes to what changes the method:
a smaller batch or fewer figure rows (trajectories and evaluation), gradient checkpointing
(distillation: the same gradients, one more forward), bf16 (numerics), and last, for an
adversarial method, pointwise losses. Every candidate is planned again on meta tensors, so
the advice's peak is a measurement of that setting, not an extrapolation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from rapm_core.plan.architecture import Architecture
from rapm_core.plan.config import PlanConfig
from rapm_core.plan.stages import STAGES, StageEstimate

GiB = 2 ** 30
_METHOD_FIELDS = {"gradient_checkpointing", "loss_relative", "loss_absolute"}


def with_changes(config: PlanConfig, changes: dict[str, Any]) -> PlanConfig:
    top = {k: v for k, v in changes.items() if k not in _METHOD_FIELDS}
    method = {k: v for k, v in changes.items() if k in _METHOD_FIELDS}
    return config.model_copy(update={**top, "method": config.method.model_copy(update=method)})


def flags(changes: dict[str, Any]) -> str:
    """The ``rapm plan`` options that make ``changes``."""
    parts = []
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def _pointwise(config: PlanConfig) -> dict[str, Any]:
    swap = {"adversarial": "pointwise", "both": "pointwise"}
    changes = {}
    for key in ("loss_relative", "loss_absolute"):
        value = getattr(config.method, key)
        if value in swap:
            changes[key] = swap[value]
    return changes


def _candidates(stage: str, config: PlanConfig) -> Iterator[dict[str, Any]]:
    low = [{}] if config.precision != "fp32" else [{}, {"precision": "bf16"}]
    if stage == "distill":
        checkpointing = [{}] if config.method.gradient_checkpointing else [{}, {"gradient_checkpointing": True}]
        losses = [{}, _pointwise(config)] if config.method.adversarial else [{}]
        for loss in losses:
            for precision in low:
                for ckpt in checkpointing:
                    change = {**precision, **ckpt, **loss}
                    if change:
                        yield change
    else:
        # The evaluate stage's trajectory figure decodes rows × (N+1) latents in one batch,
        # whatever --batch-size is; fewer rows is the other knob there.
        rows = [{}, {"trajectory_rows": 1}] if stage == "evaluate" and config.trajectory_rows > 1 else [{}]
        for precision in low:
            for row in rows:
                yield {**precision, **row, "batch_size": "search"}


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
                       "a larger GPU or a lower --resolution"}
