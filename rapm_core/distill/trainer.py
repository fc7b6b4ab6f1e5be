"""The trainer every method shares: one optimizer step per iteration, exact state, export.

For each ``LossTerms`` a method yields, the G terms are back-propagated into the LoRA only and
the D terms into the discriminator heads only; gradients accumulate over the iteration's terms
and both optimizers step once (AdamW, global-norm clipping, fp16 loss scaling under CUDA
autocast). A non-finite term or gradient norm skips the iteration without stepping. The state
(trainable tensors, optimizer and scaler state) round-trips exactly, which is what makes a
resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.export import pipeline_class, save_diffusers_lora, write_model_card
from rapm_core.distill.method import Example, GuidedTeacher, LossTerms, Method
from rapm_core.distill.registry import build_method
from rapm_core.distill.student import Student, load_lora_state_dict, lora_state_dict
from rapm_core.errors import ConfigError
from rapm_core.ode import SlotGrid


class NonFiniteLossError(RuntimeError):
    """A loss term (or, with ``slot=None``, a gradient norm) was NaN/inf; nothing was stepped."""

    def __init__(self, index: int, slot: int | None, term: str):
        super().__init__(f"non-finite {term} on trajectory {index}, slot {slot}; optimizers not stepped")
        self.index, self.slot, self.term = index, slot, term

    def __reduce__(self):
        return type(self), (self.index, self.slot, self.term)


def head_prefix(name: str) -> str:
    """Checkpoint key prefix of a head set (RAPM's "rel"/"abs" heads: ``disc_rel.``/``disc_abs.``)."""
    return f"disc_{name}."


class Trainer:
    """A method's student, heads and optimizers; trains the teacher UNet's LoRA in place."""

    def __init__(self, unet: torch.nn.Module, scheduler_config: Mapping[str, Any] | Any, grid: SlotGrid,
                 config: MethodConfig, device: str | torch.device = "cpu", teacher: GuidedTeacher | None = None):
        self.config, self.grid = config, grid
        self.student = Student(unet, scheduler_config, config.training, device)
        self.method: Method = build_method(self.student, grid, config, teacher)
        self.heads = self.method.heads
        training, adv = config.training, config.adversarial
        self.g_optimizer = torch.optim.AdamW(self.student.lora_params, lr=training.lr, betas=training.betas,
                                             weight_decay=training.weight_decay)
        self.d_optimizer = (torch.optim.AdamW(self.heads.parameters(), lr=adv.lr_disc,
                                              betas=adv.disc_betas or training.betas,
                                              weight_decay=training.weight_decay)
                            if len(self.heads) else None)
        self.scaler = torch.amp.GradScaler("cuda") if training.mixed_precision == "fp16" else None

    @property
    def unet(self) -> torch.nn.Module:
        return self.student.unet

    @property
    def lora_params(self) -> list[torch.nn.Parameter]:
        return self.student.lora_params

    # ---- one iteration -------------------------------------------------------------------

    def stepping(self, iteration: int) -> tuple[bool, bool]:
        """(LoRA steps, heads step) at this 0-based iteration: both, or with the alternating
        schedule the heads on even iterations and the LoRA on odd ones (PCM's)."""
        if self.d_optimizer is None:
            return True, False
        if self.config.adversarial.disc_schedule == "alternate":
            return iteration % 2 == 1, iteration % 2 == 0
        return True, True

    def train_step(self, example: Example, generator: torch.Generator, iteration: int = 0) -> dict[str, float]:
        """One optimizer step of LoRA and heads on one example (``iteration``: 0-based, for the
        alternating schedule).

        Metrics: the method's stats (unweighted terms, mean over the iteration's passes);
        ``total`` (the weighted objective summed over passes); ``grad_norm`` (LoRA, before
        clipping) and ``grad_norm_disc`` for whichever of them stepped.
        """
        self._zero_grad()
        try:
            metrics = self.accumulate_gradients(example, generator, iteration)
            metrics.update(self._step(example.index, iteration))
        except NonFiniteLossError:
            self._zero_grad()
            raise
        return metrics

    def accumulate_gradients(self, example: Example, generator: torch.Generator, iteration: int = 0) -> dict[str, float]:
        """Back-propagate every pass of the method into ``.grad``; raise at the first non-finite term."""
        sums: dict[str, float] = {"total": 0.0}
        passes = 0
        g_steps, d_steps = self.stepping(iteration)
        for terms in self.method.losses(example, generator):
            self._check_finite(terms, example.index)
            g_total = sum(terms.generator.values())
            if g_steps:
                self._backward(g_total, self.student.lora_params)
            if terms.discriminator and d_steps:
                self._backward(sum(terms.discriminator.values()), list(self.heads.parameters()))
            sums["total"] += float(g_total.detach())
            for k, v in terms.stats.items():
                sums[k] = sums.get(k, 0.0) + v
            passes += 1
        return {k: (v if k == "total" else v / passes) for k, v in sums.items()}

    def _backward(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
        # ``inputs`` confines accumulation: the G loss also depends on the heads, which must not
        # learn from it, and the D loss must not touch the LoRA.
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward(inputs=params)

    @staticmethod
    def _check_finite(terms: LossTerms, index: int) -> None:
        for name, term in {**terms.generator, **terms.discriminator}.items():
            if not torch.isfinite(term):
                raise NonFiniteLossError(index, terms.slot, name)

    def _step(self, index: int, iteration: int) -> dict[str, float]:
        clip = self.config.training.grad_clip if self.config.training.grad_clip is not None else math.inf
        g_steps, d_steps = self.stepping(iteration)
        stepping = [(name, opt, params) for name, opt, params, on in (
            ("grad_norm", self.g_optimizer, self.student.lora_params, g_steps),
            ("grad_norm_disc", self.d_optimizer, list(self.heads.parameters()), d_steps)) if on]
        if self.scaler is not None:
            for _, opt, _ in stepping:
                self.scaler.unscale_(opt)
        metrics = {name: float(torch.nn.utils.clip_grad_norm_(params, clip)) for name, _, params in stepping}
        if self.scaler is None:
            # fp16's scaler skips overflowing steps itself; in fp32/bf16 an overflow is an error.
            for name, value in metrics.items():
                if not math.isfinite(value):
                    raise NonFiniteLossError(index, None, name)
            for _, opt, _ in stepping:
                opt.step()
        else:
            for _, opt, _ in stepping:
                self.scaler.step(opt)
            self.scaler.update()
        return metrics

    def _zero_grad(self) -> None:
        self.g_optimizer.zero_grad(set_to_none=True)
        if self.d_optimizer is not None:
            self.d_optimizer.zero_grad(set_to_none=True)

    # ---- state -----------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA (peft keys) and the head sets in use ("disc_rel.*", …), CPU copies."""
        state = lora_state_dict(self.unet)
        for name, heads in self.heads.items():
            for k, v in heads.state_dict().items():
                state[head_prefix(name) + k] = v.detach().to("cpu", copy=True).contiguous()
        return state

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_lora_state_dict(self.unet, {k: v for k, v in state.items() if not k.startswith("disc_")})
        for name, heads in self.heads.items():
            prefix = head_prefix(name)
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

    def sample(self, latents: torch.Tensor, cond: Conditioning,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The student's own few-step sampler at guidance 1, as exported."""
        return self.method.sample(latents.to(self.student.device), cond.to(self.student.device), generator)

    def export(self, out_dir: str | Path, teacher: str, model_card: Mapping[str, Any],
               load_arguments: Mapping[str, Any] | None = None, call_arguments: Mapping[str, Any] | None = None) -> Path:
        """Write the diffusers LoRA, the scheduler the method samples with and a model card
        (``load_arguments`` / ``call_arguments``: what the stock pipeline's load and call also need)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_diffusers_lora(self.unet, self.student.lora_config, out_dir)
        sampler = self.method.stock_sampler()
        sampler.scheduler().save_pretrained(out_dir / "scheduler")
        write_model_card(out_dir, teacher=teacher, sampler=sampler, steps_per_slot=self.grid.steps_per_slot,
                         lora=self.student.lora_config, pipeline=pipeline_class(self.unet).__name__, extra=model_card,
                         method=self.method.name, title=self.method.title, load_arguments=load_arguments,
                         call_arguments=call_arguments)
        return out_dir
