"""``rapm plan``'s engine: predict every stage's peak accelerator memory from configs alone.

No weights and no GPU: the stages run on meta tensors under a counting dispatch mode
(``meta_memory``), on modules built from a teacher's config files or a published preset.
"""

from planner.config import PlanConfig

__all__ = ["PlanConfig", "plan"]


def __getattr__(name: str):
    # ``plan`` runs the stages (torch, diffusers, peft); imported on first use, so that the
    # config, and ``rapm plan --help`` built from it, stay cheap.
    if name == "plan":
        from planner.planner import plan

        return plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
