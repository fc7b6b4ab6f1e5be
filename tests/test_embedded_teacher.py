import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from flows import recipe
from rapm_shapes.evaluator import load_evaluator, prompt_adherence
from rapm_shapes.measure import generate, initial_latents, prompt_cycle
from rapm_shapes.train_teacher import high_noise_loss_weights, sd_scheduler

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "shapes-teacher"
EVALUATOR = ROOT / "assets" / "shapes-evaluator"


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(TEACHER)
    p.set_progress_bar_config(disable=True)
    return p


def _rapm(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rapm")
    recipe.configure(parser.add_subparsers(dest="command").add_parser("recipe"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_committed_teacher_is_a_stock_sd_pipeline(pipe):
    assert pipe.safety_checker is None
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size == 8
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.prediction_type) == \
        (0.00085, 0.012, "scaled_linear", "epsilon")
    images = pipe(["a large red square at the left"] * 2, height=32, width=32, num_inference_steps=4,
                  guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    size = sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file())
    assert size < 20e6


def test_committed_teacher_follows_prompts_with_full_guided_sampling(pipe):
    metrics = json.loads((TEACHER / "metrics.json").read_text())
    prompts = prompt_cycle(120)[::8][:16]
    latents = initial_latents(pipe, len(prompts), seed=123)
    images = generate(pipe, prompts, latents, metrics["num_slots"] * metrics["steps_per_slot"], metrics["guidance"])
    assert prompt_adherence(load_evaluator(EVALUATOR), images, prompts) >= 0.95  # the spec's bar


def test_committed_teacher_card_records_the_spec_gap_between_full_and_few_step_sampling():
    metrics = json.loads((TEACHER / "metrics.json").read_text())
    full_steps = metrics["num_slots"] * metrics["steps_per_slot"]
    rows = {(r["steps"], r["guidance"]): r for r in metrics["rows"]}
    full, few = rows[(full_steps, metrics["guidance"])], rows[(metrics["num_slots"], metrics["guidance"])]
    assert full["adherence"] >= 0.95
    # the gap distillation has to close: few-step DDIM measurably worse on domain FID
    assert few["domain_fid"] > 1.2 * full["domain_fid"]


def test_teacher_recipe_and_measurement_run_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "teacher"
    assert _rapm("recipe", "teacher", "--out", str(out), "--evaluator", str(EVALUATOR), "--n-images", "32",
                 "--vae-steps", "2", "--vae-batch", "4", "--vae-width", "8", "--text-dim", "16", "--text-layers", "1",
                 "--unet-width", "16", "--unet-steps", "3", "--unet-batch", "4", "--warmup", "1", "--log-every", "1",
                 "--measure-prompts", "4", "--guidance", "2.0") == 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a small red circle at the top").input_ids)[1:3] == \
        ["a</w>", "small</w>"]
    assert pipe.vae.config.scaling_factor > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["steps"], r["guidance"]) for r in metrics["rows"]] == [(40, 2.0), (4, 2.0)]
    assert all(0.0 <= r["adherence"] <= 1.0 and np.isfinite(r["domain_fid"]) for r in metrics["rows"])
    card = (out / "README.md").read_text()
    assert "rapm recipe teacher --out" in card
    assert "| DDIM | 40 | 2.0 |" in card and (out / "samples.png").is_file()
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "unet"] == [1, 2, 3]


def test_high_noise_weights_restore_the_x0_loss_at_high_noise_up_to_the_cap():
    alphas_cumprod = sd_scheduler().alphas_cumprod
    assert torch.equal(high_noise_loss_weights(alphas_cumprod, 1.0), torch.ones(1000))
    w = high_noise_loss_weights(alphas_cumprod, 30.0)
    inv_snr = (1 - alphas_cumprod) / alphas_cumprod
    assert w[0] == 1.0 and w[-1] == 30.0 and bool((w[1:] >= w[:-1]).all())
    middle = (inv_snr > 1) & (inv_snr < 30)
    assert middle.any() and torch.allclose(w[middle], inv_snr[middle])
