"""The student: the teacher UNet itself plus a peft LoRA, and the teacher recovered from it.

RAPM never holds a second UNet copy: wherever the teacher itself is needed (the discriminator
backbone), the same module runs with its adapters bypassed. The adapter is exported in the
diffusers LoRA format so that a stock ``pipe.load_lora_weights(dir)`` reproduces the student
exactly (see PLATFORM_NOTES.md for the two ways that silently fails).
"""

from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from rapm_core.errors import ConfigError

# PCM / LCM-LoRA's target set: every attention projection, feed-forward, ResNet conv and
# time-embedding projection, so a rank-1 adapter can still move every block.
TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


def lora_config(rank: int, lora_alpha: float | None = None) -> LoraConfig:
    """The adapter config; alpha defaults to the rank (scale 1), unlike PCM's accidental 0.125."""
    return LoraConfig(
        r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
        target_modules=list(TARGET_MODULES), init_lora_weights=True,
    )


def attach_lora(unet: torch.nn.Module, config: LoraConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, add the adapter in place and return its (fp32) trainable parameters.

    peft draws LoRA A from the global RNG; forking it under ``seed`` makes the initial student
    a function of the teacher weights and the seed alone (the basis of reproducible runs)
    without disturbing anyone else's random stream. LoRA B starts at zero, so the student
    starts as the teacher.
    """
    if getattr(unet, "_hf_peft_config_loaded", False):
        raise ConfigError("this UNet already carries an adapter; load a fresh teacher UNet for distillation")
    unet.requires_grad_(False)
    _ADAPTER_LAYERS.pop(unet, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    params = lora_parameters(unet)
    for p in params:
        # The base may be bf16/fp16; the adapter trains in fp32 (autocast handles the matmuls).
        p.data = p.data.float()
    return params


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in unet.named_parameters() if ".lora_" in name]


_ADAPTER_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, list[BaseTunerLayer]]" = weakref.WeakKeyDictionary()


@contextmanager
def teacher_mode(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the bare teacher through the student's module (adapters bypassed, not removed).

    Does per layer what ``unet.disable_adapters()`` / ``enable_adapters()`` do, over a cached
    layer list: those walk every submodule each time, which cost a quarter of a training step
    (the discriminator toggles twice per slot). peft also clears requires_grad on the adapter
    while disabled; re-enabling restores it. Gradients of graphs built inside still reach the
    adapter through inputs made outside.
    """
    layers = _ADAPTER_LAYERS.get(unet)
    if layers is None:
        layers = _ADAPTER_LAYERS[unet] = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter under peft's portable keys (no adapter name), as CPU copies."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter in place; a checkpoint of another rank or model is refused."""
    current = get_peft_model_state_dict(unet)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ConfigError(
            f"LoRA checkpoint does not fit this student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [k for k in current if tuple(current[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ConfigError(f"LoRA checkpoint shapes differ from this student's (rank changed?), e.g. {bad[0]}")
    set_peft_model_state_dict(unet, {k: v.to(current[k].dtype) for k, v in state.items()})


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def save_diffusers_lora(unet: torch.nn.Module, config: LoraConfig, out_dir: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` as stock ``load_lora_weights`` expects it.

    The raw peft keys (not ``convert_state_dict_to_diffusers``, whose old-style attention keys the
    loader skips) and the adapter metadata (without it a lora_alpha ≠ rank silently becomes 1).
    """
    pipeline_cls = StableDiffusionXLPipeline if is_sdxl_unet(unet) else StableDiffusionPipeline
    out_dir = Path(out_dir)
    pipeline_cls.save_lora_weights(
        out_dir, unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=config.to_dict(),
    )
    return out_dir


def write_model_card(out_dir: str | Path, teacher: str, num_steps: int, steps_per_slot: int, lora: LoraConfig,
                     sdxl: bool, extra: Mapping[str, Any]) -> None:
    """README.md (Hub-style card: teacher, N, M, how to sample) and ``inference.json`` (N, guidance)
    beside the LoRA, because the scheduler config alone cannot record the step count."""
    out_dir = Path(out_dir)
    settings = {"num_inference_steps": num_steps, "guidance_scale": 1.0, "teacher": teacher,
                "steps_per_slot": steps_per_slot, "lora_rank": lora.r, "lora_alpha": lora.lora_alpha}
    (out_dir / "inference.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    pipeline_cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    rows = [("teacher", teacher), ("steps N", num_steps), ("teacher steps per slot M", steps_per_slot),
            ("guidance at inference", 1.0), ("LoRA rank / alpha", f"{lora.r} / {lora.lora_alpha}")]
    rows += [(k, v) for k, v in extra.items() if not isinstance(v, Mapping)]
    lines = ["---", f"base_model: {teacher}", "library_name: diffusers",
             "tags: [lora, text-to-image, rapm, distillation]", "---", "",
             f"# RAPM {num_steps}-step LoRA for {teacher}", "",
             "Distilled with Relative and Absolute Position Matching (Zhang et al., arXiv 2503.20744).", "",
             "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]
    for k, v in extra.items():
        if isinstance(v, Mapping):
            lines += [f"## {k}", "", "| | |", "|---|---|", *(f"| {kk} | {_cell(vv)} |" for kk, vv in v.items()), ""]
    lines += ["## Use", "", "```python", f"from diffusers import {pipeline_cls}, DDIMScheduler",
              f'pipe = {pipeline_cls}.from_pretrained("{teacher}")', 'pipe.load_lora_weights("<this folder>")',
              'pipe.scheduler = DDIMScheduler.from_pretrained("<this folder>", subfolder="scheduler")',
              f'image = pipe("a prompt", num_inference_steps={num_steps}, guidance_scale=1.0).images[0]', "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _cell(value: Any) -> str:
    # Nested settings (a run's whole config) stay readable and cannot break the table.
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|")
