"""The quality benchmark's bookkeeping: its variants, its intervals and its section of RESULTS.md."""

import pytest

from rapm_core.distill.config import MethodConfig
from rapm_testing.helpers import load_benchmark
from storage.errors import StoreError


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


def test_the_target_beyond_the_intervals(quality):
    rapm, euler = [10.0, 11.0, 12.0], [40.0, 41.0, 42.0]
    assert quality.below_fraction(rapm, euler, 0.5)  # 11 + 2.48 ≤ 0.5 · (41 − 2.48)
    assert not quality.below_fraction([18.0, 19.0, 20.0], euler, 0.5)  # means meet it (19 ≤ 20.5), intervals do not
    assert not quality.below_fraction([10.0], euler, 0.5)  # one seed has no interval


def test_each_embedded_teacher_has_its_own_section_and_the_flow_store_its_token_count(quality, tmp_path):
    from argparse import Namespace

    from rapm_shapes.assets import EMBEDDED_FLOW_TEACHER, EMBEDDED_TEACHER

    assert quality.section_for(str(EMBEDDED_TEACHER)) == "## Quality"
    assert quality.section_for("assets/shapes-flow-teacher") == "## Quality on the embedded flow teacher"
    assert quality.section_for("/elsewhere/my-teacher") == "## Quality on `/elsewhere/my-teacher`"
    assert quality.curve_png(str(EMBEDDED_TEACHER)) == quality.CURVE_PNG != quality.curve_png("assets/shapes-flow-teacher")
    args = Namespace(teacher=str(EMBEDDED_FLOW_TEACHER), steps=40, max_sequence_length=16, eval_fraction=0.2,
                     guidance=4.0)
    trajectories = quality.base_config(tmp_path, 2, args).trajectories_config()
    assert (trajectories.teacher, trajectories.slots, trajectories.steps_per_slot, trajectories.max_sequence_length) == \
        (str(EMBEDDED_FLOW_TEACHER), 2, 20, 16)
    # time_curves passes its own arguments: the UNet teacher's defaults
    unet = quality.base_config(tmp_path, 4, Namespace(eval_fraction=0.2, guidance=4.0)).trajectories_config()
    assert (unet.teacher, unet.steps_per_slot) == (str(EMBEDDED_TEACHER), quality.STEPS // 4)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_the_flow_teachers_stock_default_euler_row_is_the_stock_pipelines_loop(quality, n):
    """``euler_default`` steps as ``StableDiffusion3Pipeline(..., num_inference_steps=N)`` does
    (``retrieve_timesteps`` without ``sigmas=``), unlike ``teacher_ddim``'s even grid; a VP teacher has no such row."""
    from types import SimpleNamespace

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    from rapm_core.evaluate.samplers import sample_latents
    from rapm_testing.tiny_teacher import _scheduler
    from tests.test_ode import SHAPE, FixedField, _cond

    measure = load_benchmark("quality_measure.py", "quality_measure")
    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    schema = SimpleNamespace(scheduler_config=config, num_slots=n, steps_per_slot=5, guidance=1.0)
    specs = measure._teacher_specs(SimpleNamespace(schema=schema))
    assert specs["euler_default"].nfe == specs["teacher_ddim"].nfe == n
    latents, cond = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n)), _cond()
    ours = sample_latents(specs["euler_default"], FixedField(), config, latents, cond, None)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    z = latents
    for t in retrieve_timesteps(scheduler, n, "cpu")[0]:
        z = scheduler.step(FixedField()(z, t.expand(z.shape[0]), cond.prompt_embeds).sample, t, z).prev_sample
    assert (ours - z).abs().max() <= 1e-6
    even = sample_latents(specs["teacher_ddim"], FixedField(), config, latents, cond, None)
    assert n == 1 or (even - z).abs().max() > 1e-3  # one step is the same step on both grids
    vp = SimpleNamespace(scheduler_config=dict(_scheduler("epsilon").config), num_slots=n, steps_per_slot=5, guidance=1.0)
    assert "euler_default" not in measure._teacher_specs(SimpleNamespace(schema=vp))


def test_kept_teacher_rows_are_reused(quality, tmp_path):
    """A re-run reads the rows a finished measurement kept (there is no store here to measure from)."""
    import json
    from argparse import Namespace

    config = quality.base_config(tmp_path, 4, Namespace(eval_fraction=0.2, guidance=4.0))
    (tmp_path / "n4").mkdir()
    kept = {"teacher_ref": {"domain_fid": 1.0}, "teacher_ddim": {"domain_fid": 2.0}, "dpm_solver": {"domain_fid": 3.0}}
    (tmp_path / "n4" / "teachers-s1000-64.json").write_text(json.dumps(kept))
    # a VP teacher has no euler_default row: what is kept is complete
    assert quality.teacher_rows(config.model_dump_json(), 1000, 64, quality.TEACHER_METHODS, None) == kept
    with pytest.raises(StoreError, match="not a prompt store"):  # a row it does not keep is measured: no store here
        quality.teacher_rows(config.model_dump_json(), 1000, 64, ("teacher_ddim", "other_row"), None)
