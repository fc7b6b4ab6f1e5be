"""The one call through which the code base runs a teacher's (or student's) denoising network.

Two families, told apart by the network's class, each called exactly as its stock pipeline calls it:

- ``UNet2DConditionModel`` (SD 1.5, SDXL): ``unet(sample, t, encoder_hidden_states=…,
  added_cond_kwargs=…)``, as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``;
- ``SD3Transformer2DModel`` (SD3, SD3.5): ``transformer(hidden_states=…, timestep=…,
  encoder_hidden_states=…, pooled_projections=…)`` with the timestep expanded to the batch, as
  ``StableDiffusion3Pipeline``.

A new family is one more branch here (and its LoRA targets below), not a test in the methods.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from rapm_core.conditioning import Conditioning

# PCM / LCM-LoRA's target set on UNets: every attention projection, feed-forward, ResNet conv and
# time-embedding projection, so a rank-1 adapter can still move every block.
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
# diffusers' SD3 LoRA training set (examples/dreambooth/train_dreambooth_lora_sd3.py): the joint
# blocks' image- and context-stream attention projections, which SD3LoraLoaderMixin loads.
SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


def is_transformer(model: Any) -> bool:
    """Whether ``model`` is an SD3-family transformer (else it is called as a UNet)."""
    return isinstance(model, SD3Transformer2DModel)


def lora_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The module names a distillation LoRA adapts on ``model``'s family."""
    return SD3_LORA_TARGETS if is_transformer(model) else UNET_LORA_TARGETS


def denoise(model: torch.nn.Module, sample: torch.Tensor, t: Any, cond: Conditioning) -> torch.Tensor:
    """The network's raw output for (sample, network time t, conditioning), as its stock pipeline calls it."""
    if is_transformer(model):
        timestep = torch.as_tensor(t, device=sample.device)
        if timestep.ndim == 0:  # the pipeline passes one timestep per sample
            timestep = timestep.expand(sample.shape[0])
        return model(hidden_states=sample, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                     pooled_projections=cond.pooled_prompt_embeds, return_dict=False)[0]
    return model(sample, t, **cond.unet_kwargs()).sample
