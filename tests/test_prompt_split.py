"""The train/eval split: an exact count, chosen by the seed, independent of file order, and as
stable as an exact count allows when prompts are appended."""

from __future__ import annotations

import pytest

from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.engine import ingest_prompts
from rapm_core.ingest.split import assign_splits, eval_count, split_key
from storage.prompt_store import PromptStore, prompt_id


def ingest_splits(tmp_path, name: str, prompts: list[str], **options) -> dict[str, str]:
    src = tmp_path / f"{name}.txt"
    src.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    ingest_prompts(IngestConfig(source=str(src), out=str(tmp_path / name), **options))
    return {r.text: r.split for r in PromptStore(tmp_path / name).records()}


@pytest.mark.parametrize("fraction,n,expected", [
    (0.25, 8, 2), (0.1, 30, 3), (0.35, 10, 4), (0.25, 10, 3), (0.1, 2, 1), (0.01, 5, 1), (0.9, 2, 1),
    (0.0, 100, 0), (0.5, 1, 0), (0.1, 1000, 100)])
def test_eval_count_is_round_fraction_times_n_at_least_one_of_two(fraction, n, expected):
    assert eval_count(fraction, n) == expected


def test_eight_prompts_at_a_quarter_hold_two_eval_for_every_seed(tmp_path):
    prompts = [f"a red shape number {i}" for i in range(8)]
    counts = {seed: sum(s == "eval" for s in ingest_splits(tmp_path, f"s{seed}", prompts, eval_fraction=0.25,
                                                            seed=seed).values()) for seed in range(12)}
    assert set(counts.values()) == {2}, counts


def test_split_is_reproducible_seeded_and_ignores_file_order(tmp_path):
    prompts = [f"prompt number {i}" for i in range(200)]
    first = ingest_splits(tmp_path, "a", prompts, eval_fraction=0.25)
    assert ingest_splits(tmp_path, "again", prompts, eval_fraction=0.25) == first
    assert ingest_splits(tmp_path, "reversed", prompts[::-1], eval_fraction=0.25) == first
    other_seed = ingest_splits(tmp_path, "seed1", prompts, eval_fraction=0.25, seed=1)
    assert other_seed != first and sum(s == "eval" for s in other_seed.values()) == 50


def test_raising_the_fraction_only_moves_train_prompts_to_eval():
    ids = [prompt_id(f"p{i}") for i in range(300)]
    low, high = assign_splits(ids, 7, 0.1), assign_splits(ids, 7, 0.3)
    assert all(h == "eval" for lo, h in zip(low, high) if lo == "eval")


def test_appending_prompts_moves_only_prompts_between_the_old_and_new_cut(tmp_path):
    prompts = [f"prompt number {i}" for i in range(1000)]
    before = ingest_splits(tmp_path, "before", prompts[:500], eval_fraction=0.1)
    after = ingest_splits(tmp_path, "after", prompts, eval_fraction=0.1)
    keys = {t: split_key(prompt_id(t), 0) for t in prompts}
    old_cut = sorted(keys[t] for t in before)[50 - 1]   # round(0.1 × 500)-th lowest
    new_cut = sorted(keys.values())[100 - 1]           # round(0.1 × 1000)-th lowest
    moved = {t for t in before if before[t] != after[t]}
    lo, hi = sorted((old_cut, new_cut))
    assert all(lo <= keys[t] <= hi for t in moved)
    assert all(before[t] == after[t] for t in before if keys[t] < lo or keys[t] > hi)
    assert len(moved) <= 10, len(moved)  # the cuts sit close together: few of the 500 move
