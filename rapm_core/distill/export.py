"""The student as a user gets it: the LoRA in the diffusers format, its scheduler and a model card.

The adapter is saved so that a stock ``pipe.load_lora_weights(dir)`` reproduces the student
exactly (``save_diffusers_lora`` says how that silently fails otherwise), beside the scheduler the
method samples with and ``inference.json`` (the step count, which a scheduler config cannot hold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig

from rapm_core.distill.student import lora_state_dict


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
                     sdxl: bool, extra: Mapping[str, Any], method: str = "rapm", scheduler: str = "DDIMScheduler",
                     title: str = "") -> None:
    """README.md (Hub-style card: teacher, N, M, how to sample) and ``inference.json`` (N, guidance,
    method, scheduler class) beside the LoRA, because the scheduler config alone cannot record the
    step count."""
    out_dir = Path(out_dir)
    settings = {"num_inference_steps": num_steps, "guidance_scale": 1.0, "teacher": teacher, "method": method,
                "scheduler": scheduler, "steps_per_slot": steps_per_slot, "lora_rank": lora.r,
                "lora_alpha": lora.lora_alpha}
    (out_dir / "inference.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    pipeline_cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    rows = [("teacher", teacher), ("steps N", num_steps), ("teacher steps per slot M", steps_per_slot),
            ("guidance at inference", 1.0), ("LoRA rank / alpha", f"{lora.r} / {lora.lora_alpha}")]
    rows += [(k, v) for k, v in extra.items() if not isinstance(v, Mapping) and k not in dict(rows)]
    lines = ["---", f"base_model: {teacher}", "library_name: diffusers",
             f"tags: [lora, text-to-image, {method}, distillation]", "---", "",
             f"# {method.upper()} {num_steps}-step LoRA for {teacher}", "",
             f"Distilled with {title or method.upper()}.", "",
             "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]
    for k, v in extra.items():
        if isinstance(v, Mapping):
            lines += [f"## {k}", "", "| | |", "|---|---|", *(f"| {kk} | {_cell(vv)} |" for kk, vv in v.items()), ""]
    lines += ["## Use", "", "```python", f"from diffusers import {pipeline_cls}, {scheduler}",
              f'pipe = {pipeline_cls}.from_pretrained("{teacher}")', 'pipe.load_lora_weights("<this folder>")',
              f'pipe.scheduler = {scheduler}.from_pretrained("<this folder>", subfolder="scheduler")',
              f'image = pipe("a prompt", num_inference_steps={num_steps}, guidance_scale=1.0).images[0]', "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _cell(value: Any) -> str:
    # Nested settings (a run's whole config) stay readable and cannot break the table.
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|")
