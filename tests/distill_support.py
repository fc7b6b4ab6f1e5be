"""Builders shared by the distillation tests: a fresh teacher UNet per student (the Trainer
adapts the UNet in place), random conditioning of the right shapes, a real teacher trajectory."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.method import Example
from rapm_core.distill.trainer import Trainer
from rapm_core.sampler import ode_sample
from rapm_core.ode import SlotGrid

LATENT = (1, 4, 16, 16)


def load_unet(teacher_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")


def perturb_unet_weights(teacher_dir) -> None:
    """Other weights at the same path, as a retrained or overwritten teacher would leave."""
    unet = load_unet(teacher_dir)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.01)
    unet.save_pretrained(teacher_dir / "unet")


def scheduler_config(teacher_dir):
    return DDIMScheduler.load_config(teacher_dir, subfolder="scheduler")


def random_cond(unet, seed: int = 0, tokens: int = 8) -> Conditioning:
    """Content is irrelevant to the math; SDXL's time ids are those of a 32×32 image (16² latents)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, tokens, unet.config.cross_attention_dim, generator=g)
    if unet.config.addition_embed_type != "text_time":
        return Conditioning(embeds)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return Conditioning(embeds, torch.randn(1, pooled_dim, generator=g), torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]))


def teacher_trajectory(teacher_dir, grid: SlotGrid, seed: int = 0) -> Example:
    """Z with every fine position (K+1, C, H, W) from the shared DDIM sampler, guidance 1."""
    unet = load_unet(teacher_dir)
    cond = random_cond(unet, seed)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed + 100))
    positions = ode_sample(unet, scheduler_config(teacher_dir), noise, cond, grid.total_steps, return_positions=True)[0]
    return Example(positions=positions, cond=cond, index=seed)


def method_config(**overrides) -> MethodConfig:
    """Small heads keep CPU tests fast. Both RAPM losses are adversarial unless overridden: the
    two discriminators are the path with the most to check."""
    return MethodConfig.from_options(**{"disc_channels": 16, "loss_relative": "adversarial",
                                        "loss_absolute": "adversarial", **overrides})


def make_distiller(teacher_dir, grid: SlotGrid, **overrides) -> Trainer:
    """A trainer on a freshly loaded teacher (see ``method_config`` for the defaults)."""
    return Trainer(load_unet(teacher_dir), scheduler_config(teacher_dir), grid, method_config(**overrides))


def grid_for(teacher_dir, n: int, m: int) -> SlotGrid:
    return SlotGrid.from_scheduler(scheduler_config(teacher_dir), n, m)
