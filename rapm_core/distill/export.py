"""The student as a user gets it: the LoRA in the diffusers format, its scheduler and a model card.

The adapter is saved so that a stock ``pipe.load_lora_weights(dir)`` reproduces the student
exactly (``save_diffusers_lora`` says how that silently fails otherwise), beside the scheduler the
method samples with and ``inference.json`` (the step count and any ``set_timesteps`` arguments such
as a flow teacher's ``sigmas``, which a scheduler config cannot hold).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig

from rapm_core.denoiser import is_transformer
from rapm_core.distill.student import lora_state_dict
from rapm_core.ode import StockSampler

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name stock ``load_lora_weights`` looks for


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def pipeline_class(denoiser: torch.nn.Module) -> type:
    """The stock pipeline a user loads the student's LoRA into."""
    if is_transformer(denoiser):
        return StableDiffusion3Pipeline
    return StableDiffusionXLPipeline if is_sdxl_unet(denoiser) else StableDiffusionPipeline


def save_diffusers_lora(unet: torch.nn.Module, config: LoraConfig, out_dir: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` as stock ``load_lora_weights`` expects it.

    The raw peft keys (not ``convert_state_dict_to_diffusers``, whose old-style attention keys the
    loader skips) and the adapter metadata (without it a lora_alpha ≠ rank silently becomes 1), in an
    order that does not depend on the process.
    """
    out_dir = Path(out_dir)
    # Each pipeline's loader reads the denoiser's adapter under its own component name.
    component = "transformer" if is_transformer(unet) else "unet"
    pipeline_class(unet).save_lora_weights(out_dir, **{f"{component}_lora_layers": lora_state_dict(unet),
                                                       f"{component}_lora_adapter_metadata": adapter_metadata(config)})
    sort_safetensors_metadata(out_dir / LORA_WEIGHTS)
    return out_dir


def adapter_metadata(config: LoraConfig) -> dict[str, Any]:
    """The adapter config as the export records it: sets (``target_modules``) as sorted lists, since
    diffusers writes them in set order, which changes with the process's hash seed, and identical
    runs must export identical bytes."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file at ``path`` with its ``__metadata__`` keys sorted.

    safetensors writes that map in the order of a Rust HashMap, which is seeded per process: two
    identical exports would otherwise differ in their first bytes. The tensors, their order and
    the data are left as they are (offsets are relative to the data, which does not move).
    """
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads its header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


def write_model_card(out_dir: str | Path, teacher: str, sampler: StockSampler, steps_per_slot: int,
                     lora: LoraConfig, pipeline: str, extra: Mapping[str, Any], method: str = "rapm",
                     title: str = "", load_arguments: Mapping[str, Any] | None = None,
                     call_arguments: Mapping[str, Any] | None = None) -> None:
    """README.md (Hub-style card: teacher, N, M, how to sample) and ``inference.json`` (N, guidance,
    method, scheduler class, ``set_timesteps`` arguments) beside the LoRA, because the scheduler
    config alone cannot record the step count. ``pipeline``: the stock pipeline class's name;
    ``load_arguments`` / ``call_arguments``: what its ``from_pretrained`` / call also needs (an
    SD3 teacher without T5: ``text_encoder_3=None``; its T5 token count ``max_sequence_length``)."""
    out_dir = Path(out_dir)
    num_steps, scheduler = sampler.num_steps, sampler.class_name
    load_arguments, call_arguments = dict(load_arguments or {}), dict(call_arguments or {})
    settings = {"num_inference_steps": num_steps, "guidance_scale": 1.0, "teacher": teacher, "method": method,
                "scheduler": scheduler, "set_timesteps": sampler.timestep_kwargs, "steps_per_slot": steps_per_slot,
                "lora_rank": lora.r, "lora_alpha": lora.lora_alpha, "pipeline": pipeline,
                **({"pipeline_call": call_arguments} if call_arguments else {})}
    (out_dir / "inference.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    pipeline_cls = pipeline
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
              f'pipe = {pipeline_cls}.from_pretrained("{teacher}"{_python_keywords(load_arguments)})',
              'pipe.load_lora_weights("<this folder>")',
              f'pipe.scheduler = {scheduler}.from_pretrained("<this folder>", subfolder="scheduler")',
              f'image = pipe("a prompt", num_inference_steps={num_steps}{call_arguments_source(sampler)}'
              f'{_python_keywords(call_arguments)}, guidance_scale=1.0).images[0]', "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def call_arguments_source(sampler: StockSampler) -> str:
    """The pipeline call's extra keywords (a flow student's ``sigmas=``), as Python source."""
    return _python_keywords(sampler.timestep_kwargs)


def _python_keywords(arguments: Mapping[str, Any]) -> str:
    # JSON writes lists, numbers and strings as Python does; None and booleans differ.
    return "".join(f", {k}={repr(v) if v is None or isinstance(v, bool) else json.dumps(v)}"
                   for k, v in arguments.items())


def _cell(value: Any) -> str:
    # Nested settings (a run's whole config) stay readable and cannot break the table.
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|")
