"""The student: the teacher's denoiser itself (a UNet or an SD3 transformer) plus a peft LoRA,
and the teacher recovered from it.

No method holds a second UNet copy: wherever the teacher itself is needed (a discriminator
backbone, a peer's teacher solver step), the same module runs with its adapters bypassed
(:func:`teacher_mode`). :class:`Student` bundles what every method asks of the student: its
deterministic jump on the teacher's ODE under the run's autocast, the ODE and the trainable LoRA.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from rapm_core.conditioning import Conditioning
from rapm_core.denoiser import UNET_LORA_TARGETS, lora_targets
from rapm_core.distill.config import TrainingConfig
from rapm_core.errors import ConfigError
from rapm_core.sampler import guided_prediction
from rapm_core.ode import Level, ode_for

# The UNet family's targets (what the planner counts); each family's own are in ``rapm_core.denoiser``.
TARGET_MODULES = UNET_LORA_TARGETS


def lora_config(rank: int, lora_alpha: float | None = None,
                target_modules: tuple[str, ...] = UNET_LORA_TARGETS) -> LoraConfig:
    """The adapter config; alpha defaults to the rank (scale 1), unlike PCM's accidental 0.125."""
    return LoraConfig(
        r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules), init_lora_weights=True,
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
    layer list: those walk every submodule each time, a large share of a training step
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


class Student:
    """The teacher UNet (adapted in place) with a fresh LoRA, on ``device``.

    Holds the ODE of the teacher's scheduler config (VP-DDIM or rectified flow, see
    ``rapm_core.ode``) and the autocast the run's ``mixed_precision`` asks for.
    """

    def __init__(self, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any, training: TrainingConfig,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if training.mixed_precision != "no" and self.device.type != "cuda":
            raise ConfigError(
                f"mixed_precision={training.mixed_precision!r} needs a CUDA device; use 'no' on {self.device.type}")
        self.training = training
        self.ode = ode_for(scheduler_config, self.device)
        self.scheduler_config = self.ode.scheduler_config
        self.unet = unet.to(self.device).eval()
        self.lora_config = lora_config(training.rank, training.lora_alpha, lora_targets(self.unet))
        self.lora_params = attach_lora(self.unet, self.lora_config, seed=training.init_seed)
        # diffusers' ``unet.dtype`` walks every submodule, as costly as a small UNet call; a
        # method reads it several times per slot, so once here.
        self.dtype = self.unet.dtype
        if training.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def autocast(self):
        if self.training.mixed_precision == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.training.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def predict(self, z: torch.Tensor, t: Level, cond: Conditioning) -> torch.Tensor:
        """The network's raw output at (z, level t) with the LoRA enabled, guidance 1, in fp32."""
        with self.autocast():
            return guided_prediction(self.unet, z.to(self.dtype), self.ode.network_time(t), cond).float()

    def jump(self, z: torch.Tensor, t_from: Level, t_to: Level, cond: Conditioning) -> torch.Tensor:
        """One deterministic student step t_from → t_to on the teacher's ODE (any parameterisation)."""
        return self.ode.step(z, self.predict(z, t_from, cond), t_from, t_to)
