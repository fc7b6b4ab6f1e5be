"""A teacher's architecture from its config files alone (or a preset), and its modules on meta.

Only ``model_index.json``, the denoiser's (``unet/`` or an SD3-class teacher's ``transformer/``),
``vae/``, ``scheduler/`` and ``text_encoder*/`` configs are read — never a weights file — so a
hub id costs a few kilobytes when the hub is reachable and a local directory is read in
milliseconds. Modules are built under ``torch.device("meta")``: real diffusers/transformers
classes with every parameter's shape and dtype, and no storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from diffusers import (
    AutoencoderKL, DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, PretrainedConfig, T5Config

from rapm_core.errors import ConfigError
from rapm_core.ode import is_flow_config
from planner.presets import preset_configs
from rapm_core.teacher import SD3_MAX_SEQUENCE_LENGTH, detect_kind, teacher_identifier
from storage.trajectory_schema import TeacherKind

CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TEXT_ENCODER_CLASSES = (*CLIP_CLASSES, "T5EncoderModel")
# Where each teacher kind keeps its denoiser, and the class that builds it.
DENOISERS: dict[str, tuple[str, type]] = {
    "sd15": ("unet", UNet2DConditionModel), "sdxl": ("unet", UNet2DConditionModel),
    "sd3": ("transformer", SD3Transformer2DModel),
}
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Architecture:
    source: str  # what was read: "preset sd15 (hub id)", a directory, or a hub id
    kind: TeacherKind
    denoiser: dict  # the UNet's config, or an SD3-class teacher's transformer config
    vae: dict
    scheduler: dict
    text_encoders: tuple[tuple[str, dict], ...]  # (transformers class name, config) in pipeline order
    # SD3-class: T5 tokens per prompt (``rapm trajectories --max-sequence-length``; zeros without T5).
    max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH

    @property
    def is_transformer(self) -> bool:
        return self.kind == "sd3"

    @property
    def denoiser_folder(self) -> str:
        return DENOISERS[self.kind][0]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def native_resolution(self) -> int:
        size = self.denoiser["sample_size"]
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def clip_encoders(self) -> tuple[tuple[str, dict], ...]:
        return tuple(e for e in self.text_encoders if e[0] in CLIP_CLASSES)

    @property
    def has_t5(self) -> bool:
        return any(cls == "T5EncoderModel" for cls, _ in self.text_encoders)

    @property
    def clip_length(self) -> int:
        return int(self.text_encoders[0][1]["max_position_embeddings"])

    @property
    def text_length(self) -> int:
        """Tokens of the stored prompt embeddings: CLIP's, and for SD3 T5's after them (the pipeline
        concatenates them along the sequence; without T5 it puts zeros there)."""
        return self.clip_length + (self.max_sequence_length if self.is_transformer else 0)

    @property
    def embed_dim(self) -> int:
        if self.is_transformer:
            return int(self.denoiser["joint_attention_dim"])
        return int(self.denoiser["cross_attention_dim"])

    @property
    def pooled_dim(self) -> int | None:
        if self.is_transformer:
            return int(self.denoiser["pooled_projection_dim"])
        if self.kind != "sdxl":
            return None
        return int(self.text_encoders[-1][1].get("projection_dim") or self.text_encoders[-1][1]["hidden_size"])

    @property
    def has_time_ids(self) -> bool:
        """SDXL's six micro-conditioning numbers (original size, crop, target size)."""
        return self.kind == "sdxl"

    def _downsampling(self) -> int:
        if self.is_transformer:
            return int(self.denoiser["patch_size"])
        return 2 ** (len(self.denoiser["block_out_channels"]) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents at ``resolution`` pixels (default: the native one)."""
        px = resolution or self.native_resolution
        what = "patch size" if self.is_transformer else "UNet downsampling"
        factor = self.vae_scale_factor * self._downsampling()
        if px % factor:
            raise ConfigError(f"resolution {px} px is not a multiple of {factor} (VAE factor × {what})")
        side = px // self.vae_scale_factor
        most = self.denoiser.get("pos_embed_max_size") if self.is_transformer else None
        if most and side // self._downsampling() > most:
            # The transformer crops its learned position grid; past its size there is none.
            raise ConfigError(f"resolution {px} px is past the transformer's position embedding "
                              f"(at most {most * factor} px)")
        return int(self.denoiser.get("in_channels", 4)), side, side

    # -- modules (on meta unless asked: a real device gets random weights) ------------------------
    def build_denoiser(self, dtype: torch.dtype, device: str | torch.device = "meta") -> torch.nn.Module:
        """The UNet, or an SD3-class teacher's transformer, frozen, in ``dtype``."""
        with torch.device(device):
            model = DENOISERS[self.kind][1].from_config(self.denoiser)
        # nn.Module.to, not diffusers' override, which warns about fp32-kept modules these have none of.
        return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)

    def build_vae(self, dtype: torch.dtype, device: str | torch.device = "meta") -> AutoencoderKL:
        with torch.device(device):
            vae = AutoencoderKL.from_config(self.vae)
        return torch.nn.Module.to(vae, dtype).eval().requires_grad_(False)

    def build_text_encoders(self, dtype: torch.dtype, device: str | torch.device = "meta") -> list[torch.nn.Module]:
        encoders = []
        for cls_name, cfg in self.text_encoders:
            config_cls = T5Config if cls_name == "T5EncoderModel" else CLIPTextConfig
            config = config_cls.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
            with torch.device(device):
                encoders.append(getattr(transformers, cls_name)(config).to(dtype).eval().requires_grad_(False))
        return encoders

    def scheduler_config(self) -> dict:
        """What Stage A samples with: the flow teacher's own Euler scheduler, else DDIM on the betas."""
        cls = FlowMatchEulerDiscreteScheduler if is_flow_config(self.scheduler) else DDIMScheduler
        return dict(cls.from_config(self.scheduler).config)


def _encoders(index: dict, configs: dict, source: str) -> tuple[tuple[str, dict], ...]:
    """(class, config) of each text encoder ``model_index.json`` names (an absent one is ``null``)."""
    encoders = []
    for sub in ENCODER_FOLDERS:
        entry = index.get(sub)
        if not entry or entry[1] is None:
            continue
        if entry[1] not in TEXT_ENCODER_CLASSES:
            raise ConfigError(f"teacher {source!r}: {sub} is a {entry[1]}; the planner knows {TEXT_ENCODER_CLASSES}")
        encoders.append((entry[1], configs[sub]()))
    if not encoders:
        raise ConfigError(f"teacher {source!r} names no text encoder in model_index.json")
    return tuple(encoders)


def from_preset(name: str) -> Architecture:
    hub_id, configs = preset_configs(name)
    index = configs["model_index"]
    kind = "sd3" if "transformer" in configs else name
    encoders = _encoders(index, {sub: (lambda sub=sub: configs[sub]) for sub in ENCODER_FOLDERS}, name)
    return Architecture(f"preset {name} ({hub_id})", kind, configs[DENOISERS[kind][0]], configs["vae"],
                        configs["scheduler"], encoders)


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
    folder, denoiser_cls = DENOISERS[kind]
    index = _read(ref, "model_index.json", lambda: dict(DiffusionPipeline.load_config(ref, revision=revision)))
    denoiser = _read(ref, f"{folder}/config.json",
                     lambda: dict(denoiser_cls.load_config(ref, subfolder=folder, revision=revision)))
    vae = _read(ref, "vae/config.json",
                lambda: dict(AutoencoderKL.load_config(ref, subfolder="vae", revision=revision)))
    scheduler = _read(ref, "scheduler/scheduler_config.json",
                      lambda: dict(DDIMScheduler.load_config(ref, subfolder="scheduler", revision=revision)))
    configs = {sub: (lambda sub=sub: _read(ref, f"{sub}/config.json", lambda: PretrainedConfig.get_config_dict(
        ref, subfolder=sub, revision=revision)[0])) for sub in ENCODER_FOLDERS}
    return Architecture(ref, kind, denoiser, vae, scheduler, _encoders(index, configs, source))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def checkpoint_count(module: torch.nn.Module) -> int:
    """Numbers a checkpoint of ``module`` holds: parameters and persistent buffers (SD3's position
    embedding grid is one, counted in the published sizes)."""
    return sum(t.numel() for t in module.state_dict().values())
