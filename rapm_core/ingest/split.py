"""Which prompts are held out for evaluation.

The eval split is the ``eval_count(fraction, n)`` prompts with the lowest seeded hash of their id.
So the split holds an exact count, depends only on the seed and the set of prompts (not on their
order in the file), and raising the fraction only moves train prompts to eval. When prompts are
appended to a source, an earlier prompt changes side only if its hash lies between the old and
the new cut (the k-th lowest hash before and after): prompts below both cuts stay eval, above
both stay train. For prompts that hash alike the two cuts sit close to the fraction, so few move.
No exact count can promise more: keeping every earlier side on every append would fix which
positions in the file are eval, leaving nothing for the seed to choose.
"""

from __future__ import annotations

import hashlib
from decimal import ROUND_HALF_UP, Decimal
from typing import Sequence

from storage.prompt_store import Split


def split_key(pid: str, seed: int) -> int:
    """A prompt's place in the seeded order (a hash of seed and id)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big")


def eval_count(eval_fraction: float, n: int) -> int:
    """round(fraction × n), halves up, kept to at least one eval and one train prompt when the
    fraction is above zero and there are two prompts or more."""
    if eval_fraction <= 0 or n < 2:
        return 0
    # Decimal of the typed value: 0.35 × 10 is 3.5 (a half, rounded up), not 3.4999… in floats.
    k = int((Decimal(repr(eval_fraction)) * n).to_integral_value(rounding=ROUND_HALF_UP))
    return min(max(k, 1), n - 1)


def assign_splits(ids: Sequence[str], seed: int, eval_fraction: float) -> list[Split]:
    """Each id's side, in the order given."""
    k = eval_count(eval_fraction, len(ids))
    held_out = set(sorted(ids, key=lambda pid: (split_key(pid, seed), pid))[:k])
    return ["eval" if pid in held_out else "train" for pid in ids]
