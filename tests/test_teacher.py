"""Teacher loading and encoding, per-trajectory noise, and recovering x̂0 from stored positions."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from rapm_core.errors import ConfigError
from rapm_core.sampler import guided_prediction
from rapm_core.ode import SlotGrid
from rapm_core.ode.vp import ddim_step, inference_scheduler, predict_x0_eps, solve_x0_eps
from rapm_core.teacher import (
    count_truncated, decode_latents, encode_prompts, encode_uncond, latent_shape, load_teacher, load_unet, load_vae,
)
from rapm_core.trajectories.chain import boundary_x0, initial_noise, teacher_trajectories, trajectory_seed

LONG = "a very small red circle in the top left corner of a large empty canvas"  # > 32 chars


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_load_teacher_detects_kind_and_encodes_like_stock(kind, tiny_sd15_dir, tiny_sdxl_dir):
    teacher = load_teacher(tiny_sd15_dir if kind == "sd15" else tiny_sdxl_dir)
    assert teacher.kind == kind and teacher.latent_shape == (4, 16, 16)
    assert teacher.scheduler_config["beta_schedule"] == "scaled_linear"
    cond, uncond = encode_prompts(teacher, ["a red circle", LONG]), encode_uncond(teacher)
    assert cond.prompt_embeds.shape[0] == 2 and uncond.prompt_embeds.shape[0] == 1
    assert cond.prompt_embeds.shape[1:] == uncond.prompt_embeds.shape[1:]
    if kind == "sdxl":  # force_zeros_for_empty_prompt: the stock uncond row is all zeros
        assert cond.pooled_prompt_embeds.shape == (2, 32) and cond.time_ids.tolist()[1] == [32, 32, 0, 0, 32, 32]
        assert not uncond.prompt_embeds.any() and not uncond.pooled_prompt_embeds.any()
    else:
        assert cond.pooled_prompt_embeds is None and uncond.prompt_embeds.abs().sum() > 0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_truncation_is_counted_not_logged_per_batch(tiny_sd15_dir):
    teacher = load_teacher(tiny_sd15_dir)
    assert count_truncated(teacher, ["short", LONG, LONG + "!"]) == 2
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # conftest silences diffusers; the stock warning needs it on
    records = _Records()
    log = logging.getLogger(type(teacher.pipe).__module__)
    log.addHandler(records)
    try:
        teacher.pipe.encode_prompt([LONG], "cpu", 1, False)  # stock: one warning per call
        assert any("truncated" in m for m in records.messages)
        records.messages.clear()
        encode_prompts(teacher, [LONG])
    finally:
        log.removeHandler(records)
        diffusers_logging.set_verbosity(level)
    assert records.messages == []


def test_unloadable_teachers_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot load teacher 'nobody/no-such-model'.*offline\? pass a local"):
        load_teacher("nobody/no-such-model")  # HF_HUB_OFFLINE=1 in conftest
    with pytest.raises(ConfigError, match="cannot load teacher"):
        load_unet(tmp_path / "empty")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="is a FluxPipeline; RAPM supports StableDiffusionPipeline"):
        load_teacher(tmp_path / "flux")


def test_unet_and_vae_load_alone_with_the_pipelines_weights(tiny_sd15_dir):
    teacher = load_teacher(tiny_sd15_dir)
    unet = load_unet(tiny_sd15_dir, dtype=torch.float16)
    assert unet.dtype == torch.float16 and latent_shape(unet.config) == (4, 16, 16)
    w_pipe, w_alone = teacher.unet.conv_in.weight, unet.conv_in.weight
    assert torch.equal(w_pipe.half(), w_alone) and not unet.training
    vae = load_vae(tiny_sd15_dir)
    assert torch.equal(vae.decoder.conv_out.weight, teacher.pipe.vae.decoder.conv_out.weight)


def test_decode_matches_the_stock_pipeline_image(tiny_sd15_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    final = []
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=lambda p, i, t, kw: final.append(kw["latents"]) or kw,
                 callback_on_step_end_tensor_inputs=["latents"]).images
    mine = decode_latents(load_vae(tiny_sd15_dir), final[-1]).numpy()
    assert mine.shape == image.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(mine, image, atol=1e-5)


def test_trajectory_noise_depends_only_on_its_own_seed():
    seeds = [trajectory_seed(7, i) for i in range(5)]
    assert len(set(seeds)) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [trajectory_seed(7, i) for i in range(5)] and trajectory_seed(8, 0) != seeds[0]
    whole = initial_noise(seeds, (4, 8, 8), torch.float32, "cpu")
    tail = initial_noise(seeds[3:], (4, 8, 8), torch.float32, "cpu")  # a resume or a shard
    assert torch.equal(whole[3:], tail)


@pytest.mark.parametrize("fixture", ["tiny_sd15_dir", "tiny_sd15_vpred_dir"])
def test_x0_from_two_stored_positions_equals_the_unets_prediction(fixture, request):
    teacher = load_teacher(request.getfixturevalue(fixture))
    cfg = teacher.scheduler_config
    grid = SlotGrid.from_scheduler(cfg, 2, 2)
    cond, uncond = encode_prompts(teacher, ["a red circle", "green"]), encode_uncond(teacher)
    noise = initial_noise([trajectory_seed(0, i) for i in range(2)], teacher.latent_shape, torch.float32, "cpu")
    z = teacher_trajectories(teacher.unet, cfg, grid, noise, cond, uncond, 7.5)
    ac = inference_scheduler(cfg).alphas_cumprod
    k = 2  # the start of the second slot
    with torch.no_grad():
        out = guided_prediction(teacher.unet, z[:, k], grid.fine[k], cond, 7.5, uncond)
    x0_unet, eps_unet = predict_x0_eps(z[:, k], out, grid.fine[k], ac, cfg["prediction_type"])
    x0, eps = solve_x0_eps(z[:, k], z[:, k + 1], grid.fine[k], grid.fine_prev(k), ac)
    torch.testing.assert_close(x0, x0_unet, rtol=0, atol=1e-4)
    torch.testing.assert_close(eps, eps_unet, rtol=0, atol=1e-4)
    # and the pair reproduces the stored next position through the DDIM step
    nxt = ddim_step(z[:, k], eps, grid.fine[k], grid.fine_prev(k), ac, "epsilon")
    torch.testing.assert_close(nxt, z[:, k + 1], rtol=0, atol=1e-5)

    at, x0s = z[0][grid.boundary_indices()], boundary_x0(z[0], grid)
    assert at.shape == (3, 4, 16, 16) and x0s.shape == (2, 4, 16, 16)
    assert torch.equal(at[1], z[0, 2]) and torch.equal(at[2], z[0, 4])
    torch.testing.assert_close(x0s[1], x0_unet[0], rtol=0, atol=1e-4)

