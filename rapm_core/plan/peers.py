"""One training iteration of the peers (LCM-LoRA, PCM) as PEERS.md states them, for the planner.

The project does not train the peers yet; this is their per-iteration computation written with
the project's own pieces (``guided_prediction``, ``teacher_mode``, ``FeatureTaps``, ``HeadSet``,
the DDIM step and the losses), so its memory and FLOPs are what a peer run on the same
student costs: batch 1; a no-grad guided teacher step (CFG doubles the UNet batch, adapters
bypassed); a no-grad target call of the same LoRA UNet; one student forward and backward;
PCM optionally adds the adversarial terms on the teacher's features, as RAPM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.plan.engine import (
    FeatureTaps, HeadSet, attach_lora, discriminator_hinge_loss, generator_adversarial_loss, lora_config, pseudo_huber,
    teacher_mode,
)
from rapm_core.sampler import guided_prediction
from rapm_core.schedule import ddim_step, predict_x0_eps, renoise

GRID_STEPS = 50  # LCM/PCM's teacher grid: 50 DDIM steps of 20 timesteps
GUIDANCE = 5.0  # any w > 1 costs the same: the doubled batch
HUBER_C = 0.001
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary-condition constants


@dataclass
class PeerTrainer:
    unet: torch.nn.Module
    method: str  # "lcm" or "pcm"
    adversarial: bool
    lora_params: list[torch.nn.Parameter]
    heads: torch.nn.Module | None
    taps: FeatureTaps | None
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer | None
    alphas_cumprod: torch.Tensor
    slots: int  # PCM's phases = the student's step count

    @classmethod
    def build(cls, unet: torch.nn.Module, method: str, rank: int, adversarial: bool, disc_channels: int,
              gradient_checkpointing: bool, alphas_cumprod: torch.Tensor, slots: int) -> "PeerTrainer":
        lora = attach_lora(unet, lora_config(rank))
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        taps = heads = d_opt = None
        if adversarial:
            taps = FeatureTaps(unet)
            heads = HeadSet(taps.channels, disc_channels).to(alphas_cumprod.device)
            d_opt = torch.optim.AdamW(heads.parameters(), lr=1e-5, betas=(0.0, 0.999))
        return cls(unet, method, adversarial, lora, heads, taps, torch.optim.AdamW(lora, lr=1e-4), d_opt,
                   alphas_cumprod, slots)

    def _times(self, generator: torch.Generator) -> tuple[int, int, int]:
        """(t₊, t, s): the drawn grid step, its teacher end, and PCM's phase end (LCM: the clean end)."""
        step = 1000 // GRID_STEPS
        n = int(torch.randint(GRID_STEPS, (1,), generator=generator))
        t_plus, t = step * (n + 1) - 1, max(step * n - 1, 0)
        edges = [math.floor(e) for e in torch.linspace(0, GRID_STEPS, self.slots + 1)[:-1].tolist()]
        e = max(x for x in edges if x <= n)
        return t_plus, t, max(step * e - 1, -1)

    def _boundary(self, x: torch.Tensor, x0: torch.Tensor, t: int) -> torch.Tensor:
        # LCM's f(x, t) = c_skip·x + c_out·x̂0 (σ_data 0.5, timestep scaling 10).
        scaled = TIMESTEP_SCALING * t
        c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
        c_out = scaled / math.sqrt(scaled ** 2 + SIGMA_DATA ** 2)
        return c_skip * x + c_out * x0

    def _map(self, x: torch.Tensor, out: torch.Tensor, t: int, s: int) -> torch.Tensor:
        if self.method == "lcm":
            return self._boundary(x, predict_x0_eps(x, out, t, self.alphas_cumprod)[0], t)
        return ddim_step(x, out, t, s, self.alphas_cumprod)

    def train_step(self, x0: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                   generator: torch.Generator) -> None:
        unet, ac = self.unet, self.alphas_cumprod
        self.g_optimizer.zero_grad(set_to_none=True)
        if self.d_optimizer is not None:
            self.d_optimizer.zero_grad(set_to_none=True)
        t_plus, t, s = self._times(generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_plus = renoise(x0.float(), -1, t_plus, noise.float(), ac)
        with torch.no_grad():
            with teacher_mode(unet):
                teacher = guided_prediction(unet, x_plus.to(unet.dtype), t_plus, cond, GUIDANCE, uncond)
            x_t = ddim_step(x_plus, teacher.float(), t_plus, t, ac)
            target = self._map(x_t, unet(x_t.to(unet.dtype), t, **cond.unet_kwargs()).sample.float(), t, s)
        out = unet(x_plus.to(unet.dtype), t_plus, **cond.unet_kwargs()).sample.float()
        fake = self._map(x_plus, out, t_plus, s)
        loss = pseudo_huber(fake, target, HUBER_C)
        if self.adversarial:
            t_adv = int(torch.randint(max(s, 0), min(max(s, 0) + 1000 // self.slots, 1000), (1,), generator=generator))
            adv_noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            fake_feats = self.taps(renoise(fake, s, t_adv, adv_noise, ac).to(unet.dtype), t_adv, cond)
            with torch.no_grad():
                real_feats = self.taps(renoise(target, s, t_adv, adv_noise, ac).to(unet.dtype), t_adv, cond)
            loss = loss + 0.1 * generator_adversarial_loss(self.heads(fake_feats), "hinge")
            d_loss = discriminator_hinge_loss(self.heads(real_feats), self.heads([f.detach() for f in fake_feats]))
        loss.backward(inputs=self.lora_params)
        torch.nn.utils.clip_grad_norm_(self.lora_params, 1.0)
        self.g_optimizer.step()
        if self.adversarial:
            d_loss.backward(inputs=list(self.heads.parameters()))
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), 1.0)
            self.d_optimizer.step()
