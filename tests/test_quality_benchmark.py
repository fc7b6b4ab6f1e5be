"""The quality benchmark's bookkeeping: its section of RESULTS.md and the variants it runs."""

import importlib.util
from pathlib import Path

import pytest

from rapm_core.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rewriting_the_quality_section_keeps_the_other_sections(quality, tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Speed\n\nfast\n\n## Quality\n\nold table\n\n## Later\n\nkept\n\n"
                       "## Quality on an older teacher\n\nhistory\n")
    monkeypatch.setattr(quality, "RESULTS", results)
    quality.write_section("## Quality\n\nnew table\n")
    text = results.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("## Speed") < text.index("new table") < text.index("## Later") and "kept" in text and "fast" in text
    quality.write_section("## Quality\n\nnewer\n")
    text = results.read_text()
    assert text.count("## Quality\n") == 1 and "newer" in text and text.endswith("## Quality on an older teacher\n\nhistory\n")


def test_every_variant_is_a_valid_distill_config_that_changes_something(quality):
    changed = {name for name, (_, overrides) in quality.VARIANTS.items()
               if DistillConfig().model_copy(update=overrides) != DistillConfig()}
    for _, overrides in quality.VARIANTS.values():
        DistillConfig.model_validate({**DistillConfig().model_dump(), **overrides})
    # Only the variants that restate a default are no-ops (the script leaves those out).
    assert set(quality.VARIANTS) - changed == {"default", "losses-pointwise", "d1", "rank1", "lr1e-3"}
