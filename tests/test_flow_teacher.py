"""The embedded flow teacher: the recipe's pieces against stock diffusers, the recipe end to end at
toy size, and the tiny random SD3 builders later SD3 tests start from."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from flows.cli import build_parser
from rapm_shapes.train_flow_teacher import T5_TOKENS, noisy_latents, prompt_embeddings, sample_sigmas
from rapm_testing.tiny_sd3 import build_tiny_sd3, load_tiny_sd3
from tests.test_embedded_teacher import EVALUATOR, ROOT, TEACHER

FLOW_TEACHER = ROOT / "assets" / "shapes-flow-teacher"


def _rapm(*argv: str) -> int:
    args = build_parser("recipe").parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def toy_flow_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "teacher"
    assert _rapm("recipe", "flow-teacher", "--out", str(out), "--evaluator", str(EVALUATOR), "--n-images", "32",
                 "--text-dim", "16", "--projection-dim", "8", "--heads", "2", "--head-dim", "8", "--layers", "1",
                 "--steps", "3", "--batch", "4", "--warmup", "1", "--log-every", "1", "--measure-prompts", "4",
                 "--guidance", "2.0") == 0
    return out


def _load(directory) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(directory, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flow_recipe_writes_a_pipeline_stock_sd3_loads_and_a_card_that_measured_it(toy_flow_teacher):
    out = toy_flow_teacher
    pipe = _load(out)
    assert pipe.text_encoder_3 is None and type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a small red circle at the top").input_ids)[1:3] == \
        ["a</w>", "small</w>"]
    vae = pipe.vae.config
    assert vae.shift_factor is not None and vae.scaling_factor > 0
    images = pipe(["a large red square at the left"] * 2, height=32, width=32, num_inference_steps=3,
                  guidance_scale=3.0, max_sequence_length=T5_TOKENS, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()

    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["steps"], r["shift"], r["guidance"]) for r in metrics["rows"]] == \
        [(40, 1.0, 2.0), (40, 2.0, 2.0), (40, 3.0, 2.0), (4, metrics["shift"], 2.0)]
    assert metrics["max_sequence_length"] == T5_TOKENS
    assert pipe.scheduler.config.shift == metrics["shift"]  # the measured best is what loads
    card = (out / "README.md").read_text()
    assert "rapm recipe flow-teacher --out" in card and f"max_sequence_length={T5_TOKENS}" in card
    assert "| Euler | 40 | 1.0 | 2.0 |" in card and (out / "samples.png").is_file()
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "flow"] == [1, 2, 3]
    assert not (out / "_checkpoint").exists()


def test_training_prompt_embeddings_are_the_stock_pipelines(toy_flow_teacher):
    pipe = _load(toy_flow_teacher)
    prompts = ["a small red circle at the top", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, None, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_TOKENS)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        mine, mine_pooled = prompt_embeddings((pipe.text_encoder, pipe.text_encoder_2), ids,
                                              pipe.transformer.config.joint_attention_dim, T5_TOKENS)
    assert torch.equal(mine, embeds) and torch.equal(mine_pooled, pooled)


def test_training_interpolation_and_velocity_are_the_schedulers():
    """x_σ is the scheduler's ``scale_noise``, and one stock Euler step with the target velocity
    ε − x0 moves x_σ exactly to x_σ' on the same straight line."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    t, sigma, sigma_next = scheduler.timesteps[1], scheduler.sigmas[1], scheduler.sigmas[2]
    x_t = noisy_latents(x0, noise, sigma.view(1))
    assert torch.allclose(x_t, scheduler.scale_noise(x0, t.view(1), noise), atol=1e-6)
    stepped = scheduler.step(noise - x0, t, x_t).prev_sample
    assert torch.allclose(stepped, noisy_latents(x0, noise, sigma_next.view(1)), atol=1e-5)


def test_sigma_sampling_is_logit_normal_or_uniform():
    gen = torch.Generator().manual_seed(0)
    logit = torch.logit(sample_sigmas(20000, "logit_normal", gen))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    uniform = sample_sigmas(20000, "uniform", gen)
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01


@pytest.mark.parametrize("with_t5, sd35", [(True, False), (False, False), (True, True)])
def test_tiny_sd3_pipelines_load_with_stock_diffusers_and_sample(tmp_path, with_t5, sd35):
    pipe = load_tiny_sd3(build_tiny_sd3(tmp_path / "sd3", with_t5=with_t5, sd35=sd35))
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.text_encoder_3 is not None) == with_t5
    assert bool(pipe.transformer.config.dual_attention_layers) == sd35
    images = pipe(["a red cat"], num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt",
                  max_sequence_length=16).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_each_measure_command_refuses_the_other_family_in_one_line():
    for command, other in (("measure-flow", "rapm recipe measure"), ("measure", "rapm recipe measure-flow")):
        teacher = TEACHER if command == "measure-flow" else FLOW_TEACHER
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "recipe", command, "--teacher", str(teacher)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"measure it with `{other}`" in proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def committed():
    return _load(FLOW_TEACHER)


def test_committed_flow_teacher_is_a_stock_sd3_pipeline_under_20_mb(committed):
    assert type(committed.transformer).__name__ == "SD3Transformer2DModel" and committed.text_encoder_3 is None
    assert committed.transformer.config.pooled_projection_dim == \
        committed.text_encoder.config.projection_dim + committed.text_encoder_2.config.projection_dim
    metrics = json.loads((FLOW_TEACHER / "metrics.json").read_text())
    assert committed.scheduler.config.shift == metrics["shift"]
    images = committed(["a large red square at the left"] * 2, height=32, width=32, num_inference_steps=4,
                       guidance_scale=metrics["guidance"], max_sequence_length=metrics["max_sequence_length"],
                       output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert sum(f.stat().st_size for f in FLOW_TEACHER.rglob("*") if f.is_file()) < 20e6


def test_committed_flow_teacher_card_records_its_adherence_and_the_few_step_gap():
    metrics = json.loads((FLOW_TEACHER / "metrics.json").read_text())
    rows = {(r["steps"], r["shift"], r["guidance"]): r for r in metrics["rows"]}
    full = rows[(metrics["num_slots"] * metrics["steps_per_slot"], metrics["shift"], metrics["guidance"])]
    few = rows[(metrics["num_slots"], metrics["shift"], metrics["guidance"])]
    assert full["adherence"] >= 0.95
    # the gap distillation has to close: few-step Euler measurably worse on domain FID
    assert few["domain_fid"] > 1.2 * full["domain_fid"]
    assert f"{full['adherence']:.3f}" in (FLOW_TEACHER / "README.md").read_text()
