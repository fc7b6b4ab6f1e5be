"""RAPM Stage B: one training iteration of the few-step student on one stored trajectory.

Per slot n (N−1 → 0) the student jumps once, z^φ_n = DDIM(z_{n+1}, t_{n+1} → t_n, ε_φ), and is
compared with two targets from the stored teacher trajectory Z: the absolute position
z̃_n = Z[(N−n)·M] and the relative position ẑ_n, the student's own (detached) jump from the
teacher's point d fine steps into the slot. The student's position is detached before the next
slot, so each slot's graph is freed by its own backward and memory is that of one student call.
Gradients are summed over slots and both optimizers step once per iteration.

All randomness of an iteration (slot choice, discriminator time t′, re-noise noise) comes from
the caller's CPU generator, so a run resumed from a checkpoint continues bit-identically.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import pydantic
import torch

from rapm_core.conditioning import Conditioning
from rapm_core.discriminator import FeatureTaps, HeadSet
from rapm_core.errors import ConfigError
from rapm_core.losses import (
    discriminator_accuracy,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    pointwise_loss,
)
from rapm_core.sampler import ddim_sample, guided_prediction
from rapm_core.schedule import SlotGrid, ddim_step, inference_scheduler, renoise
from rapm_core.student import (
    attach_lora,
    is_sdxl_unet,
    load_lora_state_dict,
    lora_config,
    lora_state_dict,
    save_diffusers_lora,
    write_model_card,
)

LossMode = Literal["adversarial", "pointwise", "both", "off"]
HEAD_PREFIXES = {"rel": "disc_rel.", "abs": "disc_abs."}


class DistillConfig(pydantic.BaseModel):
    """RAPM's method hyperparameters (not paths, not data): what a run's config hash covers.

    Defaults come from the quality benchmark (``benchmarks/RESULTS.md``): pointwise (pseudo-Huber)
    ℓ_rel and ℓ_abs, because on the embedded teacher they beat the paper's adversarial losses at
    equal iterations (domain FID 19.1 vs 42.2, lr 1e-4) in under half the time per iteration;
    the two discriminators remain one option away ("adversarial" or "both"). lr 1e-3, ten times
    LCM-LoRA's, because pointwise matching takes it (FID 13.8 vs 19.1 at 1e-4). Rank 1 is the
    paper's; no weight decay, so the rank-1 A is not pulled towards zero; grad clip 1.0 as
    diffusers' training scripts; heads 256 wide, where PCM uses the feature width (320–1280 on
    SD) and would cost ~100M parameters per head set.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    rank: int = pydantic.Field(1, ge=1, description="LoRA rank; 1 as in the paper's SDXL run (~7 MB)")
    lora_alpha: float | None = pydantic.Field(None, gt=0, description="LoRA alpha; None means = rank (scale 1)")
    lr: float = pydantic.Field(1e-3, gt=0, description="AdamW learning rate of the LoRA")
    lr_disc: float = pydantic.Field(1e-4, gt=0, description="AdamW learning rate of the discriminator heads")
    betas: tuple[float, float] = pydantic.Field((0.9, 0.999), description="AdamW betas, both optimizers")
    weight_decay: float = pydantic.Field(0.0, ge=0, description="AdamW weight decay, both optimizers")
    grad_clip: float | None = pydantic.Field(1.0, gt=0, description="max global grad norm per optimizer; None = off")
    relative_offset: int = pydantic.Field(1, ge=0, description="d: fine steps into the slot for the relative target")
    slots_per_iteration: Literal["all", "random"] = pydantic.Field(
        "all", description="all slots per iteration, or one slot drawn from the run's generator")
    loss_relative: LossMode = pydantic.Field("pointwise", description="ℓ_rel: adversarial, pointwise, both or off")
    loss_absolute: LossMode = pydantic.Field("pointwise", description="ℓ_abs: adversarial, pointwise, both or off")
    pointwise: Literal["huber", "l2"] = pydantic.Field("huber", description="pointwise distance")
    huber_c: float = pydantic.Field(0.001, gt=0, description="pseudo-Huber c (PCM's 0.001)")
    lambda_rel: float = pydantic.Field(1.0, ge=0, description="λ_rel")
    lambda_abs: float = pydantic.Field(1.0, ge=0, description="λ_abs")
    lambda_adv: float = pydantic.Field(1.0, ge=0, description="λ_adv: weight of each adversarial G term")
    gen_loss: Literal["hinge", "linear"] = pydantic.Field(
        "hinge", description="G loss: relu(1 − D(fake)) or −D(fake)")
    disc_channels: int = pydantic.Field(256, ge=1, description="inner width of every discriminator head")
    gradient_checkpointing: bool = pydantic.Field(False, description="checkpoint the student's UNet call")
    mixed_precision: Literal["no", "bf16", "fp16"] = pydantic.Field(
        "no", description="autocast for UNet and heads on CUDA; LoRA and heads stay fp32")
    max_consecutive_nonfinite: int = pydantic.Field(
        5, ge=1, description="the flow aborts after this many skipped iterations in a row")
    init_seed: int = pydantic.Field(0, description="seed of the initial LoRA A and head weights")

    @pydantic.model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.loss_relative == "off" and self.loss_absolute == "off":
            raise ValueError("loss_relative and loss_absolute are both 'off': nothing to train")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self

    def adversarial(self, kind: Literal["rel", "abs"]) -> bool:
        return self._mode(kind) in ("adversarial", "both")

    def pointwise_on(self, kind: Literal["rel", "abs"]) -> bool:
        return self._mode(kind) in ("pointwise", "both")

    def weight(self, kind: Literal["rel", "abs"]) -> float:
        return self.lambda_rel if kind == "rel" else self.lambda_abs

    def _mode(self, kind: str) -> str:
        return self.loss_relative if kind == "rel" else self.loss_absolute


class NonFiniteLossError(RuntimeError):
    """A loss term (or, with ``slot=None``, a gradient norm) was NaN/inf; nothing was stepped."""

    def __init__(self, index: int, slot: int | None, term: str):
        super().__init__(f"non-finite {term} on trajectory {index}, slot {slot}; optimizers not stepped")
        self.index, self.slot, self.term = index, slot, term

    def __reduce__(self):
        return type(self), (self.index, self.slot, self.term)


@dataclass
class Example:
    positions: torch.Tensor  # (K+1, C, H, W): the stored teacher trajectory Z, K = N·M
    cond: Conditioning  # batch 1
    index: int  # trajectory index in the store, for error reports


class SlotTargets(NamedTuple):
    absolute: torch.Tensor  # z̃_n = Z[(N−n)·M], shape (1, C, H, W)
    relative_start: torch.Tensor  # ẑ^Δ_{n+1} = Z[(N−1−n)·M + d]
    relative_time: int  # τ = t_{n+1} − Δ


def slot_targets(positions: torch.Tensor, grid: SlotGrid, n: int, d: int) -> SlotTargets:
    """The stored positions slot ``n`` is trained against (no teacher call needed)."""
    a, r = grid.absolute_index(n), grid.relative_index(n, d)
    return SlotTargets(positions[a:a + 1], positions[r:r + 1], grid.relative_time(n, d))


@dataclass
class SlotResult:
    """One slot's forward: the student position (with grad), its targets and the loss terms."""

    student: torch.Tensor  # z^φ_n, carries the LoRA graph
    relative_target: torch.Tensor  # ẑ_n, detached
    absolute_target: torch.Tensor  # z̃_n
    generator_terms: dict[str, torch.Tensor]  # weighted; summed into the LoRA's loss
    discriminator_terms: dict[str, torch.Tensor]  # per head set, on detached fakes
    stats: dict[str, float] = field(default_factory=dict)  # unweighted terms, D accuracies

    @property
    def next_input(self) -> torch.Tensor:
        """z_n = detach(z^φ_n): what slot n−1 starts from; no gradient crosses this boundary."""
        return self.student.detach()


class Distiller:
    """Trains a LoRA on the given teacher UNet (in place) with RAPM's relative/absolute losses."""

    def __init__(self, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any, grid: SlotGrid,
                 config: DistillConfig, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if not 0 <= config.relative_offset < grid.steps_per_slot:
            raise ConfigError(f"relative_offset d={config.relative_offset} must be in [0, M={grid.steps_per_slot})")
        if config.mixed_precision != "no" and self.device.type != "cuda":
            raise ConfigError(
                f"mixed_precision={config.mixed_precision!r} needs a CUDA device; use 'no' on {self.device.type}")
        self.config, self.grid = config, grid
        scheduler = inference_scheduler(scheduler_config)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)

        self.unet = unet.to(self.device).eval()
        self.lora_config = lora_config(config.rank, config.lora_alpha)
        self.lora_params = attach_lora(self.unet, self.lora_config, seed=config.init_seed)
        # diffusers' ``unet.dtype`` walks every submodule (~10 ms on a LoRA'd UNet, a UNet call's
        # worth at small sizes); it is read four times per slot, so once here.
        self.dtype = self.unet.dtype
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.taps = FeatureTaps(self.unet)
        # Heads only for the adversarial losses: a pointwise run carries no untrained weights in
        # its checkpoints, and its optimizer state holds only the LoRA's.
        self._adversarial = [k for k in HEAD_PREFIXES if config.adversarial(k)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.heads = torch.nn.ModuleDict({
                kind: HeadSet(self.taps.channels, config.disc_channels) for kind in self._adversarial
            }).to(self.device)

        adamw = dict(betas=config.betas, weight_decay=config.weight_decay)
        self.g_optimizer = torch.optim.AdamW(self.lora_params, lr=config.lr, **adamw)
        self.d_optimizer = (torch.optim.AdamW(self.heads.parameters(), lr=config.lr_disc, **adamw)
                            if self._adversarial else None)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None

    # ---- one iteration -------------------------------------------------------------------

    def train_step(self, example: Example, generator: torch.Generator) -> dict[str, float]:
        """One optimizer step of LoRA and heads on one trajectory.

        Metrics: per-term losses (unweighted, mean over the slots run) as ``rel_adv``,
        ``rel_pointwise``, ``abs_adv``, ``abs_pointwise``; ``total`` (the weighted objective
        summed over slots); ``grad_norm`` (LoRA, before clipping); per adversarial head set
        ``d_loss_{rel,abs}``, ``d_acc_real_{rel,abs}``, ``d_acc_fake_{rel,abs}`` and
        ``grad_norm_disc``.
        """
        self._zero_grad()
        try:
            metrics = self.accumulate_gradients(example, generator)
            metrics.update(self._step(example.index))
        except NonFiniteLossError:
            self._zero_grad()
            raise
        return metrics

    def accumulate_gradients(self, example: Example, generator: torch.Generator) -> dict[str, float]:
        """Run the iteration's slots, back-propagating each slot's losses into ``.grad``.

        The G terms reach only the LoRA (through the frozen backbone), the D terms only the
        heads. Raises NonFiniteLossError at the first non-finite term, without stepping.
        """
        positions = example.positions.to(self.device, torch.float32)
        if positions.shape[0] != self.grid.total_steps + 1:
            raise ConfigError(
                f"trajectory has {positions.shape[0]} positions, the grid N·M+1 = {self.grid.total_steps + 1}")
        cond = example.cond.to(self.device, self.dtype)
        z = positions[0:1]  # the student starts from the teacher's own initial noise
        slots = range(self.grid.num_slots - 1, -1, -1)
        if self.config.slots_per_iteration == "random":
            chosen = int(torch.randint(self.grid.num_slots, (1,), generator=generator))
            with torch.no_grad():
                for n in range(self.grid.num_slots - 1, chosen, -1):
                    z = self._jump(z, self.grid.slot_start(n), self.grid.slot_end(n), cond)
            slots = [chosen]

        sums: dict[str, float] = {"total": 0.0}
        for n in slots:
            result = self.slot_losses(z, positions, cond, n, generator)
            self._check_finite(result, example.index, n)
            g_total = sum(result.generator_terms.values())
            self._backward(g_total, self.lora_params)
            if result.discriminator_terms:
                self._backward(sum(result.discriminator_terms.values()), list(self.heads.parameters()))
            sums["total"] += float(g_total.detach())
            for k, v in result.stats.items():
                sums[k] = sums.get(k, 0.0) + v
            z = result.next_input
        return {k: (v if k == "total" else v / len(slots)) for k, v in sums.items()}

    def slot_losses(self, z: torch.Tensor, positions: torch.Tensor, cond: Conditioning, n: int,
                    generator: torch.Generator) -> SlotResult:
        """Slot ``n``'s student jump, targets and loss terms (the per-slot box of the diagram)."""
        cfg, grid = self.config, self.grid
        t_start, t_end = grid.slot_start(n), grid.slot_end(n)
        targets = slot_targets(positions, grid, n, cfg.relative_offset)
        with torch.no_grad():
            relative = self._jump(targets.relative_start, targets.relative_time, t_end, cond)
        student = self._jump(z.detach(), t_start, t_end, cond)
        real = {"rel": relative, "abs": targets.absolute}

        g_terms: dict[str, torch.Tensor] = {}
        d_terms: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        if self._adversarial:
            # One fresh t′ ∈ [t_n, t_{n+1}) and one noise per slot, shared by real and fake and by
            # both head sets: the discriminators then compare like with like.
            t_prime = int(torch.randint(max(t_end, 0), t_start, (1,), generator=generator))
            noise = torch.randn(student.shape, generator=generator).to(self.device)
            fake_feats = self._features(renoise(student, t_end, t_prime, noise, self.alphas_cumprod), t_prime, cond)
            with torch.no_grad():
                reals = torch.cat([real[k] for k in self._adversarial])
                real_feats = self._features(renoise(reals, t_end, t_prime, noise, self.alphas_cumprod), t_prime,
                                            cond[[0] * reals.shape[0]])
            for row, kind in enumerate(self._adversarial):
                heads = self.heads[kind]
                with self._autocast():
                    g_logits = heads(fake_feats)
                    d_fake = heads([f.detach() for f in fake_feats])
                    d_real = heads([f[row:row + 1] for f in real_feats])
                g = generator_adversarial_loss(g_logits, cfg.gen_loss)
                g_terms[f"{kind}_adv"] = cfg.weight(kind) * cfg.lambda_adv * g
                d_terms[f"d_loss_{kind}"] = discriminator_hinge_loss(d_real, d_fake)
                stats[f"{kind}_adv"] = float(g.detach())
                stats[f"d_loss_{kind}"] = float(d_terms[f"d_loss_{kind}"].detach())
                stats[f"d_acc_real_{kind}"] = discriminator_accuracy(d_real, real=True)
                stats[f"d_acc_fake_{kind}"] = discriminator_accuracy(d_fake, real=False)
        for kind in ("rel", "abs"):
            if cfg.pointwise_on(kind):
                p = pointwise_loss(student, real[kind], cfg.pointwise, cfg.huber_c)
                g_terms[f"{kind}_pointwise"] = cfg.weight(kind) * p
                stats[f"{kind}_pointwise"] = float(p.detach())
        return SlotResult(student, relative, targets.absolute, g_terms, d_terms, stats)

    # ---- pieces ----------------------------------------------------------------------------

    def _jump(self, z: torch.Tensor, t_from: int, t_to: int, cond: Conditioning) -> torch.Tensor:
        """One student DDIM jump (LoRA enabled, guidance 1), ε- or v-prediction alike."""
        with self._autocast():
            out = guided_prediction(self.unet, z.to(self.dtype), t_from, cond)
        return ddim_step(z, out.float(), t_from, t_to, self.alphas_cumprod, self.prediction_type)

    def _features(self, sample: torch.Tensor, t: int, cond: Conditioning) -> list[torch.Tensor]:
        with self._autocast():
            return self.taps(sample.to(self.dtype), t, cond)

    def _autocast(self):
        if self.config.mixed_precision == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _backward(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
        # ``inputs`` confines accumulation: the G loss also depends on the heads, which must not
        # learn from it, and the D loss must not touch the LoRA.
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward(inputs=params)

    def _check_finite(self, result: SlotResult, index: int, n: int) -> None:
        for name, term in {**result.generator_terms, **result.discriminator_terms}.items():
            if not torch.isfinite(term):
                raise NonFiniteLossError(index, n, name)

    def _step(self, index: int) -> dict[str, float]:
        clip = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        if self.scaler is not None:
            self.scaler.unscale_(self.g_optimizer)
            if self._adversarial:
                self.scaler.unscale_(self.d_optimizer)
        metrics = {"grad_norm": float(torch.nn.utils.clip_grad_norm_(self.lora_params, clip))}
        if self._adversarial:
            metrics["grad_norm_disc"] = float(torch.nn.utils.clip_grad_norm_(self.heads.parameters(), clip))
        if self.scaler is None:
            # fp16's scaler skips overflowing steps itself; in fp32/bf16 an overflow is an error.
            for name, value in metrics.items():
                if not math.isfinite(value):
                    raise NonFiniteLossError(index, None, name)
            self.g_optimizer.step()
            if self._adversarial:
                self.d_optimizer.step()
        else:
            self.scaler.step(self.g_optimizer)
            if self._adversarial:
                self.scaler.step(self.d_optimizer)
            self.scaler.update()
        return metrics

    def _zero_grad(self) -> None:
        self.g_optimizer.zero_grad(set_to_none=True)
        if self.d_optimizer is not None:
            self.d_optimizer.zero_grad(set_to_none=True)

    # ---- state -----------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA (peft keys) and the head sets in use ("disc_rel.*", "disc_abs.*"), CPU copies."""
        state = lora_state_dict(self.unet)
        for kind, heads in self.heads.items():
            for k, v in heads.state_dict().items():
                state[HEAD_PREFIXES[kind] + k] = v.detach().to("cpu", copy=True).contiguous()
        return state

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        lora = {k: v for k, v in state.items() if not any(k.startswith(p) for p in HEAD_PREFIXES.values())}
        load_lora_state_dict(self.unet, lora)
        for kind, heads in self.heads.items():
            prefix = HEAD_PREFIXES[kind]
            try:
                heads.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            except RuntimeError as e:
                raise ConfigError(f"discriminator heads in the checkpoint do not fit (disc_channels changed?): "
                                  f"{str(e).splitlines()[0]}") from e

    def optimizer_state_dict(self) -> dict:
        """The AdamW states (and the fp16 scaler's), deep-copied so later steps don't alter it."""
        state = {"generator": self.g_optimizer.state_dict()}
        if self.d_optimizer is not None:
            state["discriminator"] = self.d_optimizer.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return copy.deepcopy(state)

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        self.g_optimizer.load_state_dict(state["generator"])
        if self.d_optimizer is not None:
            self.d_optimizer.load_state_dict(state["discriminator"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

    # ---- inference and export --------------------------------------------------------------

    def sample(self, latents: torch.Tensor, cond: Conditioning, num_steps: int | None = None,
               guidance: float = 1.0, uncond: Conditioning | None = None) -> torch.Tensor:
        """The few-step student sampler: trailing DDIM, N = grid.num_slots steps by default."""
        return ddim_sample(self.unet, self.scheduler_config, latents.to(self.device), cond.to(self.device),
                           num_steps or self.grid.num_slots, guidance,
                           None if uncond is None else uncond.to(self.device))

    def export(self, out_dir: str | Path, teacher: str, model_card: Mapping[str, Any]) -> Path:
        """Write the diffusers LoRA, the N-step DDIM scheduler config and a model card."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_diffusers_lora(self.unet, self.lora_config, out_dir)
        inference_scheduler(self.scheduler_config).save_pretrained(out_dir / "scheduler")
        write_model_card(out_dir, teacher=teacher, num_steps=self.grid.num_slots,
                         steps_per_slot=self.grid.steps_per_slot, lora=self.lora_config,
                         sdxl=is_sdxl_unet(self.unet), extra=model_card)
        return out_dir
