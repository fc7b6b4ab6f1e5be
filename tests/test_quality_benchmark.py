"""The quality benchmark's bookkeeping: its variants, its intervals and its section of RESULTS.md."""

import pytest

from rapm_core.distill.config import MethodConfig
from rapm_testing.helpers import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality.py", "quality_benchmark")


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


def test_every_variant_is_a_valid_method_and_the_sweep_varies_the_discriminators(quality):
    methods = {name: MethodConfig.from_options(**options) for name, (_, _, options) in quality.VARIANTS.items()}
    assert methods["rapm"] == MethodConfig()  # the defaults, compared with everything else
    assert {methods[n].method for n in ("pcm", "lcm", "pcm-renders", "lcm-renders")} == {"pcm", "lcm"}
    sweep = [methods[n] for n in quality.GROUPS["adversarial"]]
    assert all(m.rapm.adversarial("rel") and m.rapm.adversarial("abs") for m in sweep)
    assert {m.adversarial.lambda_adv for m in sweep} == {1.0, 0.1, 0.01}
    assert {m.adversarial.disc_schedule for m in sweep} == {"simultaneous", "alternate"}
    assert {m.rapm.loss_relative for m in sweep} == {"adversarial", "both"}
    published = methods["pcm-published"]  # PCM's adversarial run as its script sets it
    assert published.method == "pcm" and published.pcm.pcm_adversarial and published.adversarial.disc_layout == "pcm"
    assert (published.adversarial.lambda_adv, published.adversarial.lr_disc, published.adversarial.disc_betas,
            published.adversarial.disc_schedule) == (0.1, 1e-5, (0.0, 0.999), "alternate")
    assert published.peer.teacher_guidance == (5.0, 6.0)
    # equal budget: RAPM's N passes per iteration, a peer's one
    assert quality.passes_per_iteration({}, 4) == 4 and quality.passes_per_iteration({"method": "lcm"}, 4) == 1


def test_intervals_and_separation(quality):
    mean, std, half = quality.interval([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0) and half == pytest.approx(4.303 / 3 ** 0.5)
    assert quality.separated([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) and not quality.separated([1, 2, 3], [2, 3, 4])
    assert quality.cell([2.0]) == "2.00"
