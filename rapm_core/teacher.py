"""The teacher: a stock diffusers SD 1.5-, SDXL- or SD3-class pipeline, and its prompt encoding.

Prompts are encoded with the pipeline's own ``encode_prompt`` (and for SDXL its pooled embeddings
and ``_get_add_time_ids``), never a re-implementation, so the stored conditioning is exactly what
a stock pipeline feeds its denoiser (UNet, or SD3's transformer). Later stages load only the
denoiser or the VAE (``load_unet``, ``load_vae``) and never touch the text encoders again.
"""

from __future__ import annotations

import functools
import logging
import socket
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from rapm_core.conditioning import Conditioning
from rapm_core.errors import ConfigError
from rapm_core.teacher_files import check_teacher_dir
from storage.trajectory_schema import TeacherKind

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PIPELINE_CLASSES: dict[str, tuple[TeacherKind, type[DiffusionPipeline]]] = {
    "StableDiffusionPipeline": ("sd15", StableDiffusionPipeline),
    "StableDiffusionXLPipeline": ("sdxl", StableDiffusionXLPipeline),
    "StableDiffusion3Pipeline": ("sd3", StableDiffusion3Pipeline),
}
# The denoiser's folder and class per teacher kind (what training loads without the text encoders).
_DENOISERS: dict[TeacherKind, tuple[str, type]] = {
    "sd15": ("unet", UNet2DConditionModel), "sdxl": ("unet", UNet2DConditionModel),
    "sd3": ("transformer", SD3Transformer2DModel),
}
# What the SD3 pipeline's encode_prompt defaults to: T5 tokens per prompt (without T5, that many zero tokens).
SD3_MAX_SEQUENCE_LENGTH = 256


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return torch.device(name)


def check_dtype_on_device(dtype: str, device: torch.device) -> None:
    """fp16 sampling on the CPU is refused: diffusers warns at every move of such a pipeline and
    it runs several times slower than fp32."""
    if dtype == "fp16" and device.type == "cpu":
        raise ConfigError("--dtype fp16 on the CPU: diffusers does not run float16 pipelines on the CPU (it warns and "
                          "runs far slower); use --dtype fp32 or bf16 on the CPU, fp16 on CUDA")


def teacher_identifier(source: str | Path) -> str:
    """The string a teacher is recorded under: local directories absolute, hub ids as given."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.is_dir() else str(source)


HUB_PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str) -> bool:
    """Whether one TCP connection to the hub (or the HTTPS proxy in the way) fails.

    Without it every hub request of a load retries with back-off, ~25 s and a warning line each
    time, to end in the error it would have given at once.
    """
    proxy = urllib.request.getproxies().get(urlparse(endpoint).scheme)
    target = urlparse(proxy if proxy and "://" in proxy else endpoint)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return True
    return False


def _hub_offline_reason() -> str | None:
    """Why a hub id can only come from the local hub cache (offline, or no hub to reach), or None."""
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if _hub_unreachable(constants.ENDPOINT):
        return f"the hub ({constants.ENDPOINT}) is unreachable"
    return None


def _hub_options(source: str) -> dict:
    """Loader options for ``source``: a hub id with no hub to reach is read from the cache only."""
    if Path(source).is_dir() or _hub_offline_reason() is None:
        return {}
    return {"local_files_only": True}


@contextmanager
def _hub_quiet() -> Iterator[None]:
    # diffusers 0.42 still passes huggingface_hub 2.x a deprecated argument on every hub lookup;
    # the warning is about diffusers, not about anything the user can change. A load's progress
    # bars ("Loading pipeline components…", transformers' "Loading weights") are not a stage's
    # progress: a stage reports its own.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _enabled in bars:
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    finally:
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()


def _path_problem(source: str) -> str | None:
    """What is wrong with a source that can only be a path (a hub id is ``name`` or ``org/name``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return "a file, not a diffusers directory"
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return "no such directory; pass a local diffusers directory"
    return None


def _cannot_load(source: str, err: Exception) -> ConfigError:
    if isinstance(err, ConfigError):
        return err
    if (problem := _path_problem(source)) is not None:
        return ConfigError(f"cannot load teacher {source!r}: {problem}")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if Path(source).is_dir():  # a local directory: the hub has nothing to do with it
        return ConfigError(f"cannot load teacher {source!r}: {first}")
    if (reason := _hub_offline_reason()) is not None:
        return ConfigError(f"cannot load teacher {source!r}: not a local directory, and not found in the Hugging Face "
                           f"cache while {reason} (offline? pass a local diffusers directory)")
    return ConfigError(f"cannot load teacher {source!r}: {first} (offline? pass a local diffusers directory)")


def _local_options(source: str, components: tuple[str, ...] | None = None) -> dict:
    """For a local teacher: every component a load reads is checked first (one line naming what
    is missing), and safetensors weights are insisted on where the directory has them."""
    if not Path(source).is_dir():
        return _hub_options(source)
    return {"use_safetensors": True} if check_teacher_dir(Path(source), source, components) else {}


def detect_kind(source: str, revision: str | None = None) -> tuple[TeacherKind, type[DiffusionPipeline]]:
    """Read only ``model_index.json`` to learn the pipeline class, before any weights load (of a
    local directory, check that every component is there)."""
    if (problem := _path_problem(source)) is not None:  # no hub lookup for what cannot be a hub id
        raise ConfigError(f"cannot load teacher {source!r}: {problem}")
    if Path(source).is_dir():
        check_teacher_dir(Path(source), source)  # a broken component named before any stage starts
    try:
        with _hub_quiet():
            config = DiffusionPipeline.load_config(source, revision=revision, **_hub_options(source))
    except Exception as err:  # hub/offline/path errors come in many types; all mean "cannot load"
        raise _cannot_load(source, err) from err
    name = config.get("_class_name")
    if name not in _PIPELINE_CLASSES:
        raise ConfigError(
            f"teacher {source!r} is a {name}; RAPM supports {', '.join(_PIPELINE_CLASSES)} teachers"
        )
    return _PIPELINE_CLASSES[name]


@dataclass
class Teacher:
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline
    kind: TeacherKind
    source: str
    revision: str | None
    # SD3-class only: the T5 tokens per prompt its encode_prompt is called with (part of what is encoded).
    max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser: the UNet, or an SD3-class teacher's transformer (called through ``rapm_core.denoiser``)."""
        return self.pipe.transformer if self.kind == "sd3" else self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.unet.config)

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]


def absent_components(source: str, revision: str | None) -> dict:
    """``None`` for the optional components a pipeline was saved without (an SD3 teacher without
    T5): ``from_pretrained`` refuses such a directory unless told."""
    with _hub_quiet():
        config = DiffusionPipeline.load_config(source, revision=revision, **_hub_options(source))
    return {name: None for name in ("text_encoder_3", "tokenizer_3")
            if name in config and not (isinstance(config[name], list) and config[name][0])}


def pipeline_arguments(schema) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a stock load and call of a store's teacher need besides the defaults (an SD3 teacher's
    absent T5, its T5 token count): (``from_pretrained`` keywords, call keywords)."""
    if schema.kind != "sd3":
        return {}, {}
    return absent_components(schema.teacher, schema.teacher_revision), {"max_sequence_length": schema.max_sequence_length}


def load_teacher(
    source: str | Path, revision: str | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH,
) -> Teacher:
    """Load a whole stock pipeline (text encoders included) from a hub id or a local directory."""
    source = teacher_identifier(source)
    kind, cls = detect_kind(source, revision)
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {}
    try:
        with _hub_quiet():
            if kind == "sd3":
                extra = absent_components(source, revision)
            pipe = cls.from_pretrained(source, revision=revision, dtype=dtype, **extra, **_local_options(source))
    except Exception as err:
        raise _cannot_load(source, err) from err
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return Teacher(pipe=pipe, kind=kind, source=source, revision=revision, max_sequence_length=max_sequence_length)


def load_store_teacher(schema, device: torch.device | str = "cpu") -> Teacher:
    """The teacher of a trajectory store, as the store encoded its prompts (its compute dtype, an
    SD3 teacher's T5 token count)."""
    return load_teacher(schema.teacher, schema.teacher_revision, resolve_dtype(schema.compute_dtype), device,
                        max_sequence_length=schema.max_sequence_length or SD3_MAX_SEQUENCE_LENGTH)


def load_unet(source: str | Path, revision: str | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", kind: TeacherKind = "sd15") -> torch.nn.Module:
    """The teacher's denoiser alone (``kind`` picks the UNet or the SD3 transformer), frozen."""
    folder, cls = _DENOISERS[kind]
    try:
        source_id = teacher_identifier(source)
        with _hub_quiet():
            unet = cls.from_pretrained(source_id, subfolder=folder, revision=revision, dtype=dtype,
                                       **_local_options(source_id, (folder,)))
    except Exception as err:
        raise _cannot_load(str(source), err) from err
    return unet.to(device).eval().requires_grad_(False)


def load_vae(source: str | Path, revision: str | None = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> AutoencoderKL:
    try:
        source_id = teacher_identifier(source)
        with _hub_quiet():
            vae = AutoencoderKL.from_pretrained(source_id, subfolder="vae", revision=revision, dtype=dtype,
                                                **_local_options(source_id, ("vae",)))
    except Exception as err:
        raise _cannot_load(str(source), err) from err
    return vae.to(device).eval().requires_grad_(False)


def latent_shape(unet_config) -> tuple[int, int, int]:
    """(C, H, W) of the latents at the teacher's default resolution (``unet.config.sample_size``).

    Stock pipelines default to ``sample_size · vae_scale_factor`` pixels, i.e. exactly this latent size.
    """
    size = unet_config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet_config.in_channels), int(h), int(w)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images (B, H, W, 3) in [0, 1], with the same scaling a stock pipeline applies."""
    z = latents.to(device=vae.device, dtype=vae.dtype)
    shift = getattr(vae.config, "shift_factor", None)
    z = z / vae.config.scaling_factor + (shift or 0.0)
    images = vae.decode(z).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def count_truncated(teacher: Teacher, prompts: list[str]) -> int:
    """How many prompts are longer than some tokenizer's limit (the encoder silently drops the rest)."""
    longest = set()
    for tok in teacher.tokenizers:
        ids = tok(prompts, padding=False, truncation=False).input_ids
        longest.update(i for i, seq in enumerate(ids) if len(seq) > tok.model_max_length)
    return len(longest)


@contextmanager
def _quiet_truncation(pipe) -> Iterator[None]:
    # Stock encode_prompt warns once per batch; truncation is reported once per run by
    # count_truncated instead.
    log = logging.getLogger(type(pipe).__module__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _sdxl_time_ids(pipe: StableDiffusionXLPipeline, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Exactly what StableDiffusionXLPipeline.__call__ builds at its default resolution.
    height = width = pipe.default_sample_size * pipe.vae_scale_factor
    proj_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                else pipe.text_encoder_2.config.projection_dim)
    return pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                  text_encoder_projection_dim=proj_dim)


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: list[str]) -> Conditioning:
    """Conditional embeddings for a batch of prompts, as the stock pipeline computes them."""
    pipe, device = teacher.pipe, teacher.device
    with _quiet_truncation(pipe):
        if teacher.kind == "sd15":
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
            return Conditioning(embeds)
        if teacher.kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=teacher.max_sequence_length)
            return Conditioning(embeds, pooled)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    time_ids = _sdxl_time_ids(pipe, pooled, embeds.dtype).to(device).repeat(len(prompts), 1)
    return Conditioning(embeds, pooled, time_ids)


@torch.no_grad()
def encode_uncond(teacher: Teacher) -> Conditioning:
    """The one unconditional row CFG uses (empty prompt; zeros for SDXL with force_zeros_for_empty_prompt)."""
    pipe, device = teacher.pipe, teacher.device
    if teacher.kind == "sd15":
        _, negative = pipe.encode_prompt([""], device, 1, True)
        return Conditioning(negative)
    if teacher.kind == "sd3":  # the negative prompt the pipeline encodes when given none
        _, negative, _, negative_pooled = pipe.encode_prompt([""], None, None, device=device,
                                                             max_sequence_length=teacher.max_sequence_length)
        return Conditioning(negative, negative_pooled)
    _, negative, _, negative_pooled = pipe.encode_prompt([""], device=device, do_classifier_free_guidance=True)
    time_ids = _sdxl_time_ids(pipe, negative_pooled, negative.dtype).to(device)
    return Conditioning(negative, negative_pooled, time_ids)
