"""The main job on the embedded default (``rapm demo``, ``make demo``, the ``embedded-demo``
deployments) and on the embedded rectified-flow teacher (``rapm demo-flow``, the
``embedded-flow-demo`` deployment): the pipeline on a committed shapes teacher and evaluator with
the built-in prompts, sized to finish on a 2-core CPU in minutes. Their values live here and only
here; only the demo commands (flows/stage_commands.py) and the deployments
(rapm_shapes/deployments.py) read them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from rapm_core.pipeline import PipelineConfig
from rapm_shapes.assets import EMBEDDED_FLOW_TEACHER, EMBEDDED_TEACHER

# Measured on a 2-core CPU (README, "Two commands"; RESULTS.md): the embedded teacher's 4-step
# DDIM is clearly worse than its 4×8-step reference there, and this many iterations on all
# train trajectories closes most of that gap in minutes. One torch thread: the embedded models'
# ops are tiny, and on a busy 2-core machine OpenMP's waiting slowed distillation many times over.
# LoRA rank 4, not the library's rank 1 (the paper's, for SDXL): tuned on this teacher. At the
# demo's 1200 student passes rank 4 ends much closer to the teacher than rank 1, beyond the
# intervals over seeds, at no measurable cost in time (RESULTS.md, "LoRA rank").
DEMO_RANK = 4
DEMO_VALUES: dict[str, Any] = {
    "work": "runs/demo",
    "threads": 1,
    "trajectories": {"steps_per_slot": 8, "guidance": 4.0, "batch_size": 16},
    "distill": {"iterations": 300, "checkpoint_every": 100, "training": {"rank": DEMO_RANK}},
    "evaluate": {"num_images": 200, "batch_size": 50},
}

# The same job on the embedded flow teacher (README, "Rectified-flow teachers"; RESULTS.md, "The
# demo on the embedded flow teacher"): its card's chosen guidance and 4×10 Euler steps, and the 16
# zero T5 tokens it was trained with (the pipeline's default 256 gives other images). Its 4-step
# Euler is clearly worse than its 40-step reference; this many iterations take the student past
# that 4-step Euler on domain FID and adherence and keep the whole run under 10 minutes there.
FLOW_DEMO_VALUES: dict[str, Any] = {
    "work": "runs/demo-flow",
    "threads": 1,
    "trajectories": {"steps_per_slot": 10, "guidance": 4.0, "batch_size": 16, "max_sequence_length": 16},
    "distill": {"iterations": 2000, "checkpoint_every": 500},
    "evaluate": {"num_images": 200, "batch_size": 50},
}


def _merged(base: dict, given: dict) -> dict:
    out = dict(base)
    for key, value in given.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


class DemoConfig(PipelineConfig):
    """The pipeline on the embedded shapes teacher, sized for a CPU: ``rapm demo``."""

    VALUES: ClassVar[dict[str, Any]] = DEMO_VALUES
    teacher: str = Field(str(EMBEDDED_TEACHER), description="teacher pipeline: local diffusers dir or hub id")

    @model_validator(mode="before")
    @classmethod
    def _demo_values(cls, data: Any) -> Any:
        # Options given on the command line (or in a deployment's parameters) refine the demo's
        # values, section by section, instead of replacing them with the stages' defaults.
        return _merged(cls.VALUES, data) if isinstance(data, dict) else data


class FlowDemoConfig(DemoConfig):
    """The pipeline on the embedded rectified-flow (SD3-class) shapes teacher, sized for a CPU: ``rapm demo-flow``."""

    VALUES: ClassVar[dict[str, Any]] = FLOW_DEMO_VALUES
    teacher: str = Field(str(EMBEDDED_FLOW_TEACHER), description="teacher pipeline: local diffusers dir or hub id")


def demo_config() -> DemoConfig:
    """The demo exactly (``rapm demo`` with no options; the deployments' parameters, rapm_shapes/deployments.py)."""
    return DemoConfig()


def flow_demo_config() -> FlowDemoConfig:
    """The flow teacher's demo exactly (``rapm demo-flow`` with no options; the ``embedded-flow-demo`` deployment)."""
    return FlowDemoConfig()
