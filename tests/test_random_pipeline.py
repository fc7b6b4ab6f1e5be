"""The dry runs' teachers: a published layout with random weights, loaded as any teacher is."""

from __future__ import annotations

import pytest
import torch

from rapm_testing.random_pipeline import save_random_pipeline, with_text_layers
from planner.validation import mid_size
from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher


@pytest.mark.parametrize("preset, pipeline", [("sd15", "StableDiffusionPipeline"),
                                              ("sdxl", "StableDiffusionXLPipeline")])
def test_random_pipeline_loads_as_a_teacher_and_conditions_the_unet(tmp_path, preset, pipeline):
    arch = with_text_layers(mid_size(width=32, text_dim=64, preset=preset), 1)
    directory = save_random_pipeline(arch, tmp_path / preset, torch.bfloat16)
    teacher = load_teacher(directory, dtype=torch.bfloat16)
    assert type(teacher.pipe).__name__ == pipeline and teacher.kind == preset
    assert teacher.dtype == torch.bfloat16
    assert all(e.config.num_hidden_layers == 1 for e in (teacher.pipe.text_encoder,
                                                          getattr(teacher.pipe, "text_encoder_2", None)) if e)
    with torch.no_grad():
        cond = encode_prompts(teacher, ["a red circle"])
        assert cond.prompt_embeds.shape[1] == arch.text_length  # the encoders' native sequence length
        assert encode_uncond(teacher).prompt_embeds.shape == cond.prompt_embeds.shape
        x = torch.randn(1, *teacher.latent_shape, dtype=torch.bfloat16)
        eps = teacher.unet(x, 500, **cond.unet_kwargs()).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()
