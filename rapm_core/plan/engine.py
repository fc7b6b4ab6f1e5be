"""The one place the planner imports the method's engine from.

The engine is being reorganised (``rapm_core/distill.py`` into a package, flows' engines into
``rapm_core/``); when these names move, only the imports below change. Everything else the
planner uses (schedule, sampler, teacher, conditioning) stays where it is.
"""

from rapm_core.discriminator import FeatureTaps, HeadSet
from rapm_core.distill import DistillConfig, Distiller, Example
from rapm_core.losses import discriminator_hinge_loss, generator_adversarial_loss, pseudo_huber
from rapm_core.student import TARGET_MODULES, attach_lora, lora_config, teacher_mode
from rapm_core.trajectory import teacher_trajectories

__all__ = [
    "DistillConfig", "Distiller", "Example", "FeatureTaps", "HeadSet", "TARGET_MODULES", "attach_lora",
    "discriminator_hinge_loss", "generator_adversarial_loss", "lora_config", "pseudo_huber", "teacher_mode",
    "teacher_trajectories",
]
