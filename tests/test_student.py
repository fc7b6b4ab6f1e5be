import pytest
import torch

from rapm_core.errors import ConfigError
from rapm_core.distill.student import (
    attach_lora,
    load_lora_state_dict,
    lora_config,
    lora_parameters,
    lora_state_dict,
    teacher_mode,
)
from rapm_testing.helpers import LATENT, load_unet, random_cond


def _predict(unet, cond, t=500):
    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return unet(x, t, **cond.unet_kwargs()).sample


def _randomise_lora_b(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if ".lora_B." in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("fixture", ["tiny_sd15_dir", "tiny_sdxl_dir"])
def test_only_lora_trains_and_student_starts_as_teacher(fixture, request):
    teacher_dir = request.getfixturevalue(fixture)
    reference, unet = load_unet(teacher_dir), load_unet(teacher_dir)
    cond = random_cond(unet)
    params = attach_lora(unet, lora_config(rank=1))

    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in unet.named_parameters() if ".lora_" in n}
    assert len(params) == len(trainable) > 0 and all(p.dtype == torch.float32 for p in params)
    # every target module kind got an adapter (convs, attention, ff, time projection)
    names = " ".join(trainable)
    for kind in ("conv1.", "conv_shortcut.", "downsamplers.0.conv.", "upsamplers.0.conv.", "to_q.", "to_out.0.",
                 "ff.net.0.proj.", "proj_in.", "time_emb_proj."):
        assert kind in names
    # LoRA B starts at zero: the student is the teacher, exactly
    assert torch.equal(_predict(unet, cond), _predict(reference, cond))


def test_teacher_mode_gives_the_original_unet_exactly(tiny_sd15_dir):
    reference, unet = load_unet(tiny_sd15_dir), load_unet(tiny_sd15_dir)
    cond = random_cond(unet)
    attach_lora(unet, lora_config(rank=2, lora_alpha=3.0))
    _randomise_lora_b(unet)

    assert not torch.allclose(_predict(unet, cond), _predict(reference, cond), atol=1e-3)
    with teacher_mode(unet):
        assert torch.equal(_predict(unet, cond), _predict(reference, cond))
        assert not any(p.requires_grad for p in lora_parameters(unet))
    # back to the student, trainable again
    assert all(p.requires_grad for p in lora_parameters(unet))
    assert not torch.allclose(_predict(unet, cond), _predict(reference, cond), atol=1e-3)


def test_initial_adapter_is_a_function_of_the_seed_and_leaves_global_rng_alone(tiny_sd15_dir):
    state = torch.random.get_rng_state()
    a, b, c = load_unet(tiny_sd15_dir), load_unet(tiny_sd15_dir), load_unet(tiny_sd15_dir)
    attach_lora(a, lora_config(1), seed=7)
    attach_lora(b, lora_config(1), seed=7)
    attach_lora(c, lora_config(1), seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if ".lora_A." in k)


def test_lora_state_round_trip_and_refusals(tiny_sd15_dir):
    src, dst = load_unet(tiny_sd15_dir), load_unet(tiny_sd15_dir)
    attach_lora(src, lora_config(1), seed=1)
    _randomise_lora_b(src)
    attach_lora(dst, lora_config(1), seed=2)
    load_lora_state_dict(dst, lora_state_dict(src))
    cond = random_cond(src)
    assert torch.equal(_predict(dst, cond), _predict(src, cond))

    with pytest.raises(ConfigError, match="already carries an adapter"):
        attach_lora(dst, lora_config(1))
    rank2 = load_unet(tiny_sd15_dir)
    attach_lora(rank2, lora_config(2))
    with pytest.raises(ConfigError, match="rank"):
        load_lora_state_dict(rank2, lora_state_dict(src))
    partial = dict(list(lora_state_dict(src).items())[2:])
    with pytest.raises(ConfigError, match="missing"):
        load_lora_state_dict(dst, partial)
