"""A teacher's architecture from its config files alone (or a preset), and its modules on meta.

Only ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/`` and ``text_encoder*/`` configs
are read — never a weights file — so a hub id costs a few kilobytes when the hub is reachable
and a local directory is read in milliseconds. Modules are built under ``torch.device("meta")``:
real diffusers/transformers classes with every parameter's shape and dtype, and no storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, PretrainedConfig

from rapm_core.errors import ConfigError
from planner.presets import preset_configs
from rapm_core.teacher import detect_kind, teacher_identifier
from storage.trajectory_schema import TeacherKind

TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclass(frozen=True)
class Architecture:
    source: str  # what was read: "preset sd15 (hub id)", a directory, or a hub id
    kind: TeacherKind
    unet: dict
    vae: dict
    scheduler: dict
    text_encoders: tuple[tuple[str, dict], ...]  # (transformers class name, config) in pipeline order

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def native_resolution(self) -> int:
        size = self.unet["sample_size"]
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def text_length(self) -> int:
        return int(self.text_encoders[0][1]["max_position_embeddings"])

    @property
    def embed_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def pooled_dim(self) -> int | None:
        if self.kind != "sdxl":
            return None
        return int(self.text_encoders[-1][1].get("projection_dim") or self.text_encoders[-1][1]["hidden_size"])

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents at ``resolution`` pixels (default: the native one)."""
        px = resolution or self.native_resolution
        factor = self.vae_scale_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)
        if px % factor:
            raise ConfigError(f"resolution {px} px is not a multiple of {factor} (VAE factor × UNet downsampling)")
        side = px // self.vae_scale_factor
        return int(self.unet.get("in_channels", 4)), side, side

    # -- modules (on meta unless asked: a real device gets random weights) ------------------------
    def build_unet(self, dtype: torch.dtype, device: str | torch.device = "meta") -> UNet2DConditionModel:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(self.unet)
        # nn.Module.to, not diffusers' override, which warns about fp32-kept modules this UNet has none of.
        return torch.nn.Module.to(unet, dtype).eval().requires_grad_(False)

    def build_vae(self, dtype: torch.dtype, device: str | torch.device = "meta") -> AutoencoderKL:
        with torch.device(device):
            vae = AutoencoderKL.from_config(self.vae)
        return torch.nn.Module.to(vae, dtype).eval().requires_grad_(False)

    def build_text_encoders(self, dtype: torch.dtype, device: str | torch.device = "meta") -> list[torch.nn.Module]:
        encoders = []
        for cls_name, cfg in self.text_encoders:
            config = CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
            with torch.device(device):
                encoders.append(getattr(transformers, cls_name)(config).to(dtype).eval().requires_grad_(False))
        return encoders

    def scheduler_config(self) -> dict:
        return dict(DDIMScheduler.from_config(self.scheduler).config)


def from_preset(name: str) -> Architecture:
    hub_id, configs = preset_configs(name)
    index = configs["model_index"]
    encoders = tuple((index[sub][1], configs[sub]) for sub in ("text_encoder", "text_encoder_2") if sub in configs)
    return Architecture(f"preset {name} ({hub_id})", name, configs["unet"], configs["vae"], configs["scheduler"],
                        encoders)


def _read(source: str, what: str, load):
    try:
        return load()
    except Exception as err:  # missing file, offline hub, malformed JSON: all "cannot read"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot read {what} of teacher {source!r}: {first}") from err


def from_teacher(source: str, revision: str | None = None) -> Architecture:
    """The architecture of a local diffusers directory or a hub id, from its config files only."""
    path = Path(source).expanduser()
    if (source.startswith(("/", ".", "~")) or path.exists()) and not path.is_dir():
        raise ConfigError(f"teacher {source!r}: no such directory")
    ref = teacher_identifier(source)
    kind, _ = detect_kind(ref, revision)
    index = _read(ref, "model_index.json", lambda: dict(DiffusionPipeline.load_config(ref, revision=revision)))
    unet = _read(ref, "unet/config.json",
                 lambda: dict(UNet2DConditionModel.load_config(ref, subfolder="unet", revision=revision)))
    vae = _read(ref, "vae/config.json",
                lambda: dict(AutoencoderKL.load_config(ref, subfolder="vae", revision=revision)))
    scheduler = _read(ref, "scheduler/scheduler_config.json",
                      lambda: dict(DDIMScheduler.load_config(ref, subfolder="scheduler", revision=revision)))
    encoders = []
    for sub in ("text_encoder", "text_encoder_2"):
        entry = index.get(sub)
        if not entry or entry[1] is None:
            continue
        if entry[1] not in TEXT_ENCODER_CLASSES:
            raise ConfigError(f"teacher {source!r}: {sub} is a {entry[1]}; the planner knows {TEXT_ENCODER_CLASSES}")
        cfg = _read(ref, f"{sub}/config.json",
                    lambda sub=sub: PretrainedConfig.get_config_dict(ref, subfolder=sub, revision=revision)[0])
        encoders.append((entry[1], cfg))
    if not encoders:
        raise ConfigError(f"teacher {source!r} names no text encoder in model_index.json")
    return Architecture(ref, kind, unet, vae, scheduler, tuple(encoders))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
