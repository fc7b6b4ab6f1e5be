"""Which prompts are held out for evaluation."""

from __future__ import annotations

import hashlib

from storage.prompt_store import Split


def split_for(pid: str, seed: int, eval_fraction: float) -> Split:
    """Each prompt's side depends only on its own id and the seed, so adding prompts to a
    source never moves the others, and raising the fraction only moves train prompts to eval."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big") / 2**64
    return "eval" if u < eval_fraction else "train"
