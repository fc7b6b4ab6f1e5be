"""The loss functionals ℓ_rel / ℓ_abs are built from: pointwise distances and hinge GAN terms.

Pointwise terms compare positions directly (PCM/iCT's pseudo-Huber is robust to the few large
latent errors an early student makes; L2 is the classic alternative). Adversarial terms take
the patch logits of every discriminator head and average over heads, so the loss scale does
not depend on how many feature maps the backbone exposes.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean over elements of sqrt((a−b)² + c²) − c: quadratic below c, linear above."""
    return (((a.float() - b.float()) ** 2 + c * c).sqrt() - c).mean()


def pointwise_loss(a: torch.Tensor, b: torch.Tensor, kind: Literal["huber", "l2"], huber_c: float) -> torch.Tensor:
    if kind == "huber":
        return pseudo_huber(a, b, huber_c)
    return F.mse_loss(a.float(), b.float())


def discriminator_hinge_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean(relu(1 − D(real))) + mean(relu(1 + D(fake))), averaged over heads.

    The caller passes fake logits computed from detached samples, so no gradient reaches the
    generator from here.
    """
    per_head = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(per_head).mean()


def generator_adversarial_loss(fake: Sequence[torch.Tensor], kind: Literal["hinge", "linear"]) -> torch.Tensor:
    """Hinge G: mean(relu(1 − D(fake))) stops pushing once a patch is judged real;
    linear G: −mean(D(fake)) always pushes. Averaged over heads."""
    if kind == "hinge":
        per_head = [F.relu(1 - f.float()).mean() for f in fake]
    else:
        per_head = [-f.float().mean() for f in fake]
    return torch.stack(per_head).mean()


def discriminator_accuracy(logits: Sequence[torch.Tensor], real: bool) -> float:
    """Fraction of patches (over all heads) on the right side of the decision boundary 0."""
    right = sum(int(((lg > 0) if real else (lg < 0)).sum()) for lg in logits)
    return right / sum(lg.numel() for lg in logits)
