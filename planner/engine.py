"""The one place the planner imports the project's engines from.

Everything the planner runs on meta tensors is the stages' own code: the method config and the
shared ``Trainer`` (which builds RAPM, PCM or LCM-LoRA from the registry), the trajectory chain,
each denoiser family's LoRA targets, the evaluation's figure decode and the stages' option
models (their defaults). When these names move, only the imports below change.
"""

from rapm_core.denoiser import lora_targets
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.lcm import LCM_ON_FLOW
from rapm_core.distill.method import Example, GuidedTeacher
from rapm_core.distill.run import build_trainer
from rapm_core.distill.trainer import Trainer
from rapm_core.evaluate.config import EvaluateOptions
from rapm_core.evaluate.trajectory_figure import decode_in_batches
from rapm_core.trajectories.chain import teacher_trajectories
from rapm_core.trajectories.config import SlotOptions, TrajectoriesOptions

__all__ = [
    "EvaluateOptions", "Example", "GuidedTeacher", "LCM_ON_FLOW", "MethodConfig",
    "SlotOptions", "TrajectoriesOptions", "Trainer", "build_trainer", "decode_in_batches", "lora_targets",
    "teacher_trajectories",
]
