"""``rapm plan``'s engine: predict every stage's peak accelerator memory from configs alone.

No weights and no GPU: the stages run on meta tensors under a counting dispatch mode
(``meta_memory``), on modules built from a teacher's config files or a published preset.
"""

from planner.config import PlanConfig

# ``plan`` itself (planner.planner) runs the stages with torch, diffusers and peft: imported where
# it is used, so that the config, and ``rapm plan --help`` built from it, stay cheap.
__all__ = ["PlanConfig"]
