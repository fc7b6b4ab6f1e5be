"""``rapm plan``: each stage's peak accelerator memory, what fits a given GPU, and the recipe's time.

No flow run: planning reads config files and runs the stages on meta tensors in this process
(``planner``), in seconds, without weights or a GPU.
"""

from __future__ import annotations

import json

from flows.cli_model import add_model_arguments, model_from_args
from rapm_core.errors import ConfigError
from planner.config import PlanConfig

GiB = 2 ** 30


def configure(parser) -> None:
    parser.description = PlanConfig.__doc__
    add_model_arguments(parser, PlanConfig)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=_cli)


def _method_label(method: dict) -> str:
    """e.g. ``rapm (ℓ_rel pointwise, ℓ_abs pointwise, rank 1, bf16 weights, checkpointing)``."""
    if method["method"] == "rapm":
        losses = f"ℓ_rel {method['rapm']['loss_relative']}, ℓ_abs {method['rapm']['loss_absolute']}"
    elif method["method"] == "pcm":
        losses = "pointwise + adversarial" if method["pcm"]["pcm_adversarial"] else "pointwise"
    else:
        losses = "pointwise"
    training = method["training"]
    parts = [losses, f"rank {training['rank']}", f"{training['weights_dtype']} weights"]
    if training["mixed_precision"] != "no":
        parts.append(f"autocast {training['mixed_precision']}")
    if training["gradient_checkpointing"]:
        parts.append("checkpointing")
    return f"{method['method']} ({', '.join(parts)})"


def _gib(nbytes: float) -> str:
    gib = nbytes / GiB
    return f"{gib:.2f}" if gib >= 0.1 else f"{gib:.2g}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def format_table(result: dict) -> str:
    """The human summary: one row per stage, then the store and the time estimate."""
    c, h, w = result["latent_shape"]
    lines = [f"{result['teacher']['source']}: {result['resolution']} px (latents {c}×{h}×{w}), "
             f"{result['precision']}, {_method_label(result['method'])}, {result['attention']} attention"]
    gpu = result["gpu_memory_gib"]
    header = f"{'stage':<13}{'peak GiB':>9}{'weights GiB':>13}  {'peak in':<25}"
    if gpu is not None:
        header += f"  {'fits ' + format(gpu, 'g') + ' GiB':<13}suggestion"
    lines.append(header)
    for name, stage in result["stages"].items():
        row = f"{name:<13}{_gib(stage['peak_bytes']):>9}{_gib(stage['weights_bytes']):>13}  {stage['peak_phase']:<25}"
        if gpu is not None:
            advice = stage["advice"]
            if stage["fits"]:
                hint = ""
            elif advice["flags"]:
                hint = f"{advice['flags']} ({_gib(advice['peak_bytes'])} GiB)"
            else:
                hint = advice["message"]
            row += f"  {'yes' if stage['fits'] else 'no':<13}{hint}"
        lines.append(row)
    if gpu is not None:
        lines.append(f"fits: peak ≤ {gpu:g} GiB less {(gpu * GiB - result['limit_bytes']) / GiB:g} GiB kept for "
                     "the CUDA context and fragmentation (--reserve)")
    store = result["store"]
    lines.append(f"store: {store['bytes_per_trajectory'] / 2**20:.2f} MiB per trajectory, "
                 f"{store['recipe_bytes'] / GiB:.2f} GiB for {result['time']['trajectories']} ({store['note']})")
    t = result["time"]
    lines.append(f"time (estimate; {t['basis']}; {t['seconds_per_call'] * 1000:.3g} ms per denoiser call): "
                 f"trajectories {_hours(t['trajectories_s'])}, distill {_hours(t['distill_s'])} for "
                 f"{t['iterations']} iterations, total {_hours(t['total_s'])} ({t['reference']})")
    return "\n".join(lines)


def _cli(args) -> int:
    if (args.teacher is None) == (args.preset is None):
        raise ConfigError("give exactly one of --teacher DIR_OR_ID and --preset NAME")
    from planner.planner import plan  # the stages on meta tensors: torch, diffusers, peft

    result = plan(model_from_args(PlanConfig, args))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
