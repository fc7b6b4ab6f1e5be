import pytest
import torch

from rapm_core.distill.discriminator import FeatureTaps, HeadSet
from rapm_core.distill.student import attach_lora, lora_config
from rapm_core.denoiser import lora_targets
from rapm_testing.helpers import (LATENT, grid_for, latent_of, load_unet, make_distiller, random_cond,
                                  teacher_trajectory)


def _reference_features(unet, x, t, cond):
    """Down/mid outputs of a full forward of the bare teacher, by the same means a user would."""
    feats = []
    hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o[0] if isinstance(o, tuple) else o))
             for b in [*unet.down_blocks, unet.mid_block]]
    with torch.no_grad():
        unet(x, t, **cond.unet_kwargs())
    for h in hooks:
        h.remove()
    return feats


@pytest.mark.parametrize("fixture", ["tiny_sd15_dir", "tiny_sdxl_dir"])
def test_taps_read_the_bare_teacher_and_skip_the_up_path(fixture, request):
    teacher_dir = request.getfixturevalue(fixture)
    reference, unet = load_unet(teacher_dir), load_unet(teacher_dir)
    cond = random_cond(unet)
    attach_lora(unet, lora_config(1))
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if ".lora_B." in name:  # a student far from the teacher: taps must not see it
            p.data = torch.randn(p.shape, generator=g)
    up_calls = []
    unet.up_blocks[0].register_forward_hook(lambda *a: up_calls.append(1))

    x = torch.randn(LATENT, generator=g)
    taps = FeatureTaps(unet)
    with torch.no_grad():
        feats = taps(x, 321, cond)
    ref = _reference_features(reference, x, 321, cond)

    assert up_calls == []
    assert len(feats) == len(reference.down_blocks) + 1 == len(taps.channels)
    for f, r, c in zip(feats, ref, taps.channels):
        assert f.shape[1] == c
        assert torch.equal(f, r)
    # the student is intact after the aborted forward: adapters back on
    with torch.no_grad():
        out = unet(x, 321, **cond.unet_kwargs()).sample
        assert not torch.allclose(out, reference(x, 321, **cond.unet_kwargs()).sample, atol=1e-3)


@pytest.mark.parametrize("fixture", ["tiny_sd15_dir", "tiny_sd3_dir"])
def test_gradients_reach_the_input_through_the_frozen_backbone(fixture, request):
    unet = load_unet(request.getfixturevalue(fixture))
    attach_lora(unet, lora_config(1, target_modules=lora_targets(unet)))
    unet.enable_gradient_checkpointing()
    cond = random_cond(unet)
    x = torch.randn(latent_of(unet), requires_grad=True)
    heads = HeadSet(FeatureTaps(unet).channels, width=8)
    feats = FeatureTaps(unet)(x, 500, cond)
    logits = heads(feats)

    # one logit per patch of every feature map
    assert [tuple(lg.shape) for lg in logits] == [(1, 1, *f.shape[-2:]) for f in feats]
    sum(lg.mean() for lg in logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    assert unet.is_gradient_checkpointing  # restored after the backbone pass


@pytest.fixture(scope="module")
def sd15_setup(tiny_sd15_dir):
    grid = grid_for(tiny_sd15_dir, 2, 2)
    return grid, teacher_trajectory(tiny_sd15_dir, grid)


def test_discriminator_step_trains_only_heads(tiny_sd15_dir, sd15_setup):
    grid, example = sd15_setup
    dist = make_distiller(tiny_sd15_dir, grid, loss_relative="adversarial", loss_absolute="adversarial")
    base = {n: p.detach().clone() for n, p in dist.unet.named_parameters() if ".lora_" not in n}
    before = dist.trainable_state_dict()

    dist.accumulate_gradients(example, torch.Generator().manual_seed(0))
    assert all(p.grad is None and not p.requires_grad
               for n, p in dist.unet.named_parameters() if ".lora_" not in n)
    dist.d_optimizer.step()

    after = dist.trainable_state_dict()
    heads_changed = [k for k in after if k.startswith("disc_") and not torch.equal(after[k], before[k])]
    assert {k.split(".")[0] for k in heads_changed} == {"disc_rel", "disc_abs"}
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("disc_"))  # LoRA untouched
    assert all(torch.equal(p, base[n]) for n, p in dist.unet.named_parameters() if ".lora_" not in n)


def test_generator_loss_reaches_lora_through_backbone_but_never_the_heads(tiny_sd15_dir, sd15_setup):
    """Adversarial-only absolute loss: the LoRA's only gradient path is through the frozen
    backbone. Scaling λ_adv changes the LoRA's gradient but must leave the heads' (D-only) alone."""
    grid, example = sd15_setup
    grads = {}
    for lam in (0.0, 1.0):
        dist = make_distiller(tiny_sd15_dir, grid, loss_relative="off", loss_absolute="adversarial", lambda_adv=lam)
        dist.accumulate_gradients(example, torch.Generator().manual_seed(0))
        grads[lam] = ([p.grad.clone() for p in dist.lora_params], [p.grad.clone() for p in dist.heads["abs"].parameters()])
        assert list(dist.heads) == ["abs"]  # ℓ_rel is off: no relative head to train

    lora0, heads0 = grads[0.0]
    lora1, heads1 = grads[1.0]
    assert all(g.abs().sum() == 0 for g in lora0)
    assert sum(g.abs().sum() for g in lora1) > 0
    assert all(torch.equal(a, b) for a, b in zip(heads0, heads1))
    assert sum(g.abs().sum() for g in heads1) > 0
