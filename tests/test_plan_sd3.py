"""``rapm plan`` on SD3-class teachers: the published SD3 / SD3.5 presets, what fits 24 GB at 1024²,
teacher directories with and without T5, adversarial losses, what distillation refuses there, and the
planner against a real CPU run of a mid-size SD3.5 layout."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from flows.cli import main
from planner import PlanConfig
from planner.advice import GiB
from planner.architecture import checkpoint_count, from_preset, parameter_count
from planner.planner import architecture, store_bytes
from planner.stages import encode, trajectories
from planner.validation import compare, compare_run, mid_size_sd3
from rapm_core.distill.config import MethodConfig
from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher
from rapm_testing.tiny_sd3 import build_tiny_sd3

SD35_COMMAND = "rapm plan --preset sd35-medium --precision bf16 --gpu-memory 24"
ADVERSARIAL_SD35_COMMAND = f"{SD35_COMMAND} --loss-relative both"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sd3_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-sd3")
    return {"t5": build_tiny_sd3(root / "t5", with_t5=True),
            "no-t5": build_tiny_sd3(root / "no-t5", with_t5=False, sd35=True)}


# -- presets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, parameters, published", [
    # transformer parameters as diffusers builds them; the model cards' sizes count the position
    # grid too (a persistent buffer in the checkpoint): 2 B, 2.5 B, 8.1 B.
    ("sd3-medium", 2_028_328_000, 2.0e9),
    ("sd35-medium", 2_243_171_520, 2.5e9),
    ("sd35-large", 8_056_627_520, 8.1e9),
])
def test_sd3_presets_build_the_published_sizes(preset, parameters, published):
    arch = from_preset(preset)
    transformer = arch.build_denoiser(torch.float32)
    assert type(transformer).__name__ == "SD3Transformer2DModel" and parameter_count(transformer) == parameters
    assert abs(checkpoint_count(transformer) - published) < 0.05 * published
    clip_l, clip_g, t5 = arch.build_text_encoders(torch.float32)
    assert abs(parameter_count(clip_l) - 123.65e6) < 0.5e6 and abs(parameter_count(clip_g) - 694.7e6) < 1e6
    assert abs(parameter_count(t5) - 4.76e9) < 0.01e9  # T5-XXL's encoder, "4.7 B" in the SD3 paper
    vae = arch.build_vae(torch.float32)
    assert vae.config.latent_channels == 16 and abs(parameter_count(vae) - 83.8e6) < 0.5e6
    assert arch.kind == "sd3" and arch.native_resolution == 1024 and arch.latent_shape() == (16, 128, 128)
    # Prompt embeddings: 77 CLIP tokens then the pipeline's 256 T5 tokens, at T5's width.
    assert (arch.text_length, arch.embed_dim, arch.pooled_dim, arch.has_time_ids) == (333, 4096, 2048, False)
    assert store_bytes(arch, PlanConfig(preset=preset))["conditioning_bytes"] == (333 * 4096 + 2048) * 4


def test_sd35_medium_names_a_rapm_setting_that_fits_24gb_at_1024(capsys):
    """The issue's target: at the native 1024², bf16, RAPM's distillation and Stage A fit 24 GB
    as they are; the evaluation fits with the batch the advice names (planned again)."""
    from test_plan import readme_commands

    argv = SD35_COMMAND.split()[1:]
    assert argv in readme_commands()
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    header, rows = out.splitlines()[0], {line.split()[0]: line for line in out.splitlines()[2:5]}
    assert "1024 px (latents 16×128×128)" in header and "rapm (ℓ_rel pointwise, ℓ_abs pointwise" in header
    assert re.search(r"\syes\s", rows["distill"] + " ") and re.search(r"\syes\s", rows["trajectories"] + " ")
    if not re.search(r"\syes\s", rows["evaluate"] + " "):
        advised = re.search(r"(--batch-size \d+) \(([\d.]+) GiB\)", rows["evaluate"])
        assert advised and float(advised.group(2)) <= 24 - PlanConfig.model_fields["reserve"].default


def test_checkpointing_is_the_advice_when_sd35_large_distillation_does_not_fit(capsys):
    code, out, err = run_cli(["plan", "--preset", "sd35-large", "--precision", "bf16", "--gpu-memory", "24",
                              "--json"], capsys)
    assert code == 0, err
    import json

    stages = json.loads(out)["stages"]
    distill = stages["distill"]
    assert distill["fits"] is False and distill["advice"]["changes"] == {"gradient_checkpointing": True}
    assert distill["advice"]["peak_bytes"] <= 23 * GiB
    assert set(distill["resident"]) >= {"transformer", "lora", "optimizer_state"}
    # Stage A holds T5-XXL beside the 8 B transformer: past 24 GB at any batch; a teacher saved
    # without T5 (zeros in its tokens' place) fits.
    assert stages["trajectories"]["fits"] is False and stages["trajectories"]["weights_bytes"] > 23 * GiB
    advice = re.search(r"a teacher saved without T5 \(text_encoder_3=None\) fits with --batch-size 1 \(([\d.]+) GiB\)",
                       stages["trajectories"]["advice"]["message"])
    assert advice and float(advice.group(1)) <= 23
    arch = from_preset("sd35-large")
    without_t5 = replace(arch, text_encoders=arch.clip_encoders)
    assert trajectories(without_t5, PlanConfig(preset="sd35-large", precision="bf16")).peak_bytes <= 23 * GiB


# -- teachers from config files ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["t5", "no-t5"])
def test_sd3_teacher_dir_is_planned_with_the_pipelines_conditioning(sd3_teachers, variant, capsys):
    """The planned prompt encoding has the shapes the stock pipeline's encode_prompt gives (T5's
    tokens, or zeros in their place without T5), and the store's size follows from them."""
    directory = str(sd3_teachers[variant])
    code, out, err = run_cli(["plan", "--teacher", directory, "--max-sequence-length", "16", "--gpu-memory", "4",
                              "--json"], capsys)
    assert code == 0, err
    import json

    result = json.loads(out)
    assert result["teacher"]["kind"] == "sd3" and result["teacher"]["denoiser"] == "transformer"
    assert all(s["fits"] and s["peak_bytes"] > s["weights_bytes"] for s in result["stages"].values())
    teacher = load_teacher(directory, max_sequence_length=16)
    real, real_uncond = encode_prompts(teacher, ["a red circle"]), encode_uncond(teacher)
    arch = architecture(PlanConfig(teacher=directory, max_sequence_length=16))
    assert arch.has_t5 == (variant == "t5")
    planned = encode(arch, arch.build_text_encoders(torch.float32), 1, torch.float32)
    for cond in (real, real_uncond):
        assert [tuple(t.shape) for t in cond.tensors()] == [tuple(t.shape) for t in planned.tensors()]
    embeds, pooled = real.prompt_embeds, real.pooled_prompt_embeds
    assert result["store"]["conditioning_bytes"] == (embeds[0].numel() + pooled[0].numel()) * 4
    c, h, w = result["latent_shape"]
    assert (c, h, w) == (16, 16, 16) and result["store"]["positions_bytes"] == (4 * 10 + 1) * c * h * w * 2


@pytest.mark.parametrize("source", ["teacher", "sd35-medium"])
def test_pcm_is_planned_on_sd3_class_teachers(sd3_teachers, source, capsys):
    """PCM's step (the guided teacher's Euler step, the student's jump, the no-grad target) on the
    transformer: planned for a teacher directory and for the published presets at 1024² in bf16."""
    import json

    where = (["--teacher", str(sd3_teachers["t5"]), "--max-sequence-length", "16"] if source == "teacher"
             else ["--preset", source, "--precision", "bf16"])
    code, out, err = run_cli(["plan", *where, "--method", "pcm", "--gpu-memory", "24", "--json"], capsys)
    assert code == 0, err
    distill = json.loads(out)["stages"]["distill"]
    assert distill["fits"] and distill["resident"]["uncond"] > 0 and "heads" not in distill["resident"]
    code, rapm, err = run_cli(["plan", *where, "--gpu-memory", "24", "--json"], capsys)
    assert code == 0 and json.loads(rapm)["stages"]["distill"]["peak_bytes"] != distill["peak_bytes"]


@pytest.mark.parametrize("adversarial, pointwise", [
    (["--loss-relative", "both"], []),
    (["--method", "pcm", "--pcm-adversarial"], ["--method", "pcm"]),
])
def test_adversarial_losses_are_planned_on_sd3_class_teachers(adversarial, pointwise, capsys):
    """RAPM's and PCM's discriminators read every joint block's image stream: the heads, their
    AdamW states and the taps' graph make the step larger than the pointwise one."""
    import json

    def planned(options):
        code, out, err = run_cli(["plan", "--preset", "sd35-medium", "--precision", "bf16", "--gpu-memory", "24",
                                  "--json", *options], capsys)
        assert code == 0, err
        return json.loads(out)["stages"]["distill"]

    with_heads, without = planned(adversarial), planned(pointwise)
    assert with_heads["resident"]["heads"] > 0 and "heads" not in without["resident"]
    assert with_heads["trainable_parameters"] > without["trainable_parameters"]
    assert with_heads["peak_bytes"] > without["peak_bytes"]


def test_readmes_adversarial_sd35_command_advises_checkpointing(capsys):
    """The README's adversarial SD3.5 Medium command, as typed: distillation past 24 GB, and
    --gradient-checkpointing (planned again) the advice, at the sizes the README gives."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    command = ADVERSARIAL_SD35_COMMAND
    assert f"`{command}` plans" in readme.replace("\n", " ")
    code, out, err = run_cli(command.split()[1:], capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("distill"))
    assert re.search(r"^distill\s+24\.9\d\s.*\sno\s+--gradient-checkpointing \(16\.5\d GiB\)$", row), row
    assert "distillation at 25.0 GiB and advises `--gradient-checkpointing` (16.6 GiB)" in readme.replace("\n", " ")


@pytest.mark.parametrize("options, message", [
    (["--method", "lcm"], "--method lcm on an SD3-class"),
    (["--preset", "sd3-medium", "--resolution", "1000"], "not a multiple of 16"),
    (["--preset", "sd3-medium", "--resolution", "4096"], "position embedding (at most 3072 px)"),
])
def test_what_distillation_refuses_on_sd3_is_one_line(sd3_teachers, options, message, capsys):
    source = [] if "--preset" in options else ["--teacher", str(sd3_teachers["t5"])]
    code, out, err = run_cli(["plan", *source, *options], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# -- the planner against a real CPU run -------------------------------------------------------------
@pytest.mark.parametrize("stage, method", [
    ("distill", {}),
    ("distill", {"gradient_checkpointing": True}),
    ("distill", {"weights_dtype": "bf16", "slots_per_iteration": "random"}),
    ("distill", {"method": "pcm"}),
    ("distill", {"loss_relative": "both"}),
    ("distill", {"loss_relative": "both", "gradient_checkpointing": True}),  # the advice on SD3.5 at 24 GB
    ("distill", {"method": "pcm", "pcm_adversarial": True}),
    ("trajectories", {}),
])
def test_planner_is_within_15_percent_of_a_real_cpu_run_of_a_mid_size_sd3(stage, method):
    arch = mid_size_sd3()
    config = PlanConfig(preset="sd35-medium", resolution=256, slots=2, steps_per_slot=2, batch_size=2,
                        max_sequence_length=arch.max_sequence_length, method=MethodConfig.from_options(**method))
    result = compare(stage, arch, config)
    assert 0.85 <= result["ratio_live"] <= 1.15, result


@pytest.mark.parametrize("variant", ["t5", "no-t5"])
def test_planner_predicts_the_engines_run_on_an_sd3_store(tmp_path, sd3_teachers, variant, make_store):
    """`rapm distill --weights-dtype bf16` as the engine builds it on a real SD3 store (its teacher's
    transformer loaded by build_trainer, a stored trajectory with its T5-length embeddings),
    against the plan made from the teacher's config files and the store's own settings."""
    store = make_store(tmp_path, sd3_teachers[variant], num=1, max_sequence_length=8)
    result = compare_run(str(store), MethodConfig.from_options(weights_dtype="bf16"))
    assert 0.85 <= result["ratio_live"] <= 1.15, result

# -- the GPU check's SD3 rows -----------------------------------------------------------------------
def test_gpu_check_has_sd3_rows_at_1024_in_bf16():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    items = module.plan_configs(smoke=False)
    sd3 = {label: item for label, item in items.items() if module.selected(label, ["sd3", "sd35"])}
    rows = (("distill", " pointwise"), ("distill", " pointwise ckpt"), ("distill", " pcm"), ("stage A", ""))
    assert set(sd3) == {f"{stage} {kind}{extra}" for kind in ("sd3-medium", "sd35-medium") for stage, extra in rows}
    for label, (spec_, fields) in sd3.items():
        config = module.plan_config(fields)
        arch = module._architecture(spec_)
        assert config.precision == "bf16" and (config.resolution or arch.native_resolution) == 1024
        method = config.distill_method()
        assert arch.kind == "sd3" and method.method == ("pcm" if label.endswith(" pcm") else "rapm")
        assert method.method == "pcm" or method.rapm.loss_relative == "pointwise"
