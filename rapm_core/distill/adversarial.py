"""Discriminator head sets on the frozen teacher's features, and the hinge terms they give.

Shared by every method with an adversarial loss (RAPM's two head sets, PCM's one). Real and fake
samples are re-noised with the same fresh noise from their level to one drawn time t′, so the
heads compare like with like; the fake keeps its graph (the G term reaches the LoRA through the
frozen backbone) and the D term sees it detached.
"""

from __future__ import annotations

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import AdversarialConfig
from rapm_core.distill.discriminator import LAYOUTS, FeatureTaps, HeadSet
from rapm_core.distill.losses import discriminator_accuracy, discriminator_hinge_loss, generator_adversarial_loss
from rapm_core.distill.method import LossTerms
from rapm_core.distill.student import Student


class Discriminators:
    """One head set per kind (e.g. "rel", "abs"), initialised from ``init_seed`` alone."""

    def __init__(self, student: Student, kinds: list[str], config: AdversarialConfig, init_seed: int):
        self.student, self.kinds, self.config = student, kinds, config
        up_blocks, per_map = LAYOUTS[config.disc_layout]
        self.taps = FeatureTaps(student.unet, up_blocks=up_blocks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.heads = torch.nn.ModuleDict({
                kind: HeadSet(self.taps.channels, config.disc_channels, per_map) for kind in kinds}).to(student.device)

    def features(self, sample: torch.Tensor, t, cond: Conditioning) -> list[torch.Tensor]:
        """The backbone's features at level ``t``."""
        with self.student.autocast():
            return self.taps(sample.to(self.student.dtype), self.student.ode.network_time(t), cond)

    def terms(self, *, fake: torch.Tensor, reals: dict[str, torch.Tensor], level: int, t_range: tuple[int, int],
              cond: Conditioning, weights: dict[str, float], generator: torch.Generator) -> LossTerms:
        """The G and D terms (and stats) of every head set: ``fake`` and ``reals[kind]`` sit at
        noise ``level``; one t′ is drawn from [t_range) and one noise for all of them. G terms are
        weighted by ``weights[kind]``·λ_adv."""
        student = self.student
        ode = student.ode
        t_prime = ode.draw_level(t_range[0], t_range[1], generator)
        noise = torch.randn(fake.shape, generator=generator).to(student.device)
        fake_feats = self.features(ode.renoise(fake, level, t_prime, noise), t_prime, cond)
        with torch.no_grad():
            real = torch.cat([reals[k] for k in self.kinds])
            real_feats = self.features(ode.renoise(real, level, t_prime, noise), t_prime, cond[[0] * real.shape[0]])
        terms = LossTerms(generator={})
        for row, kind in enumerate(self.kinds):
            heads = self.heads[kind]
            with student.autocast():
                g_logits = heads(fake_feats)
                d_fake = heads([f.detach() for f in fake_feats])
                d_real = heads([f[row:row + 1] for f in real_feats])
            g = generator_adversarial_loss(g_logits, self.config.gen_loss)
            d = discriminator_hinge_loss(d_real, d_fake)
            terms.generator[f"{kind}_adv"] = weights[kind] * self.config.lambda_adv * g
            terms.discriminator[f"d_loss_{kind}"] = d
            terms.stats.update({f"{kind}_adv": float(g.detach()), f"d_loss_{kind}": float(d.detach()),
                                f"d_acc_real_{kind}": discriminator_accuracy(d_real, real=True),
                                f"d_acc_fake_{kind}": discriminator_accuracy(d_fake, real=False)})
        return terms
