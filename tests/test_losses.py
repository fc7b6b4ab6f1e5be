import math

import pytest
import torch

from rapm_core.distill.losses import (
    discriminator_accuracy,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    pointwise_loss,
    pseudo_huber,
)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    c = 0.001
    a = torch.zeros(4)
    assert pseudo_huber(a, a, c) == 0
    small = torch.full((4,), 1e-5)
    assert pseudo_huber(small, a, c).item() == pytest.approx(0.5 * 1e-10 / c, rel=1e-2)  # fp32 cancellation
    big = torch.tensor([2.0, -2.0, 2.0, -2.0])
    assert pseudo_huber(big, a, c).item() == pytest.approx(2.0 - c, rel=1e-6)
    # per-element mean, as PCM/iCT: sqrt(d² + c²) − c averaged
    x, y = torch.tensor([0.3, -0.1]), torch.tensor([0.0, 0.2])
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.3, -0.3)) / 2
    assert pointwise_loss(x, y, "huber", c).item() == pytest.approx(expected, rel=1e-5)


def test_l2_is_mean_squared_error():
    x, y = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    assert pointwise_loss(x, y, "l2", 0.001).item() == pytest.approx(2.5)


def test_hinge_discriminator_loss_saturates_and_averages_heads():
    confident_real, confident_fake = [torch.full((1, 1, 4, 4), 2.0), torch.full((1, 1, 2, 2), 1.0)], \
        [torch.full((1, 1, 4, 4), -3.0), torch.full((1, 1, 2, 2), -1.0)]
    assert discriminator_hinge_loss(confident_real, confident_fake).item() == 0.0
    undecided = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    assert discriminator_hinge_loss(undecided, undecided).item() == pytest.approx(2.0)
    # head 1 wrong (real judged −1 → 2, fake judged +1 → 2), head 2 perfect: mean over heads = 2
    wrong_real, wrong_fake = [torch.full((1, 1, 4, 4), -1.0), torch.full((1, 1, 2, 2), 1.0)], \
        [torch.full((1, 1, 4, 4), 1.0), torch.full((1, 1, 2, 2), -1.0)]
    assert discriminator_hinge_loss(wrong_real, wrong_fake).item() == pytest.approx(2.0)


def test_generator_losses():
    fake = [torch.tensor([[-1.0, 3.0]]), torch.tensor([[0.5]])]
    # hinge: head 1 mean(relu(1−D)) = (2 + 0)/2 = 1, head 2 = 0.5 → 0.75
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(0.75)
    # linear: −mean(D): head 1 −1, head 2 −0.5 → −0.75
    assert generator_adversarial_loss(fake, "linear").item() == pytest.approx(-0.75)
    logits = torch.tensor([[0.2]], requires_grad=True)
    generator_adversarial_loss([logits], "hinge").backward()
    assert logits.grad.item() == -1.0  # pushes the fake's logit up


def test_discriminator_accuracy_counts_patches_over_heads():
    logits = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-0.5])]
    assert discriminator_accuracy(logits, real=True) == 0.5
    assert discriminator_accuracy(logits, real=False) == 0.5
