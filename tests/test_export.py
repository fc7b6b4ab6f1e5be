import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from rapm_testing.helpers import LATENT, grid_for, make_distiller, random_cond


N = 4


def _stock_sample(pipe, cond, latents):
    kwargs = dict(prompt_embeds=cond.prompt_embeds, num_inference_steps=N, guidance_scale=1.0,
                  latents=latents.clone(), output_type="latent")
    if cond.is_sdxl:  # the pipeline derives time ids (32, 32, 0, 0, 32, 32) from the size, as random_cond has them
        kwargs.update(pooled_prompt_embeds=cond.pooled_prompt_embeds, height=32, width=32)
    return pipe(**kwargs).images


@pytest.mark.parametrize("fixture,rank,alpha", [
    ("tiny_sd15_dir", 1, None),
    ("tiny_sd15_dir", 2, 5.0),  # scale 2.5 must survive the round trip (adapter metadata)
    ("tiny_sdxl_dir", 2, 5.0),
])
def test_stock_pipeline_with_exported_lora_reproduces_the_student(fixture, rank, alpha, request, tmp_path):
    teacher_dir = request.getfixturevalue(fixture)
    dist = make_distiller(teacher_dir, grid_for(teacher_dir, N, 2), rank=rank, lora_alpha=alpha)
    state = dist.trainable_state_dict()
    g = torch.Generator().manual_seed(1)
    for k in state:
        if ".lora_B." in k:  # a student clearly different from the teacher
            state[k] = 0.05 * torch.randn(state[k].shape, generator=g)
    dist.load_trainable_state_dict(state)

    export = dist.export(tmp_path / "export", teacher=str(teacher_dir),
                         model_card={"iterations": 7, "teacher guidance": 6.0, "metrics": {"fid": 12.5}})
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    sched_cfg = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert sched_cfg["timestep_spacing"] == "trailing"
    assert not sched_cfg["clip_sample"] and not sched_cfg["set_alpha_to_one"]
    assert json.loads((export / "inference.json").read_text())["num_inference_steps"] == N
    card = (export / "README.md").read_text()
    for text in (str(teacher_dir), "| steps N | 4 |", "| teacher steps per slot M | 2 |", "| iterations | 7 |",
                 "| fid | 12.5 |", f"{rank} / {alpha or rank}"):
        assert text in card

    cond = random_cond(dist.unet, seed=3)
    latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(4))
    student = dist.sample(latents, cond)

    pipeline_cls = StableDiffusionXLPipeline if cond.is_sdxl else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_pretrained(export, subfolder="scheduler")
    teacher = _stock_sample(pipe, cond, latents)
    assert (teacher - student).abs().max() > 1e-2  # the LoRA matters

    pipe.load_lora_weights(export)
    assert (_stock_sample(pipe, cond, latents) - student).abs().max() <= 1e-4
    pipe.fuse_lora()
    assert (_stock_sample(pipe, cond, latents) - student).abs().max() <= 1e-4
