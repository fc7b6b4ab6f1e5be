"""PCM on an SD3-class (rectified-flow) teacher, held equal to its published SD3 script.

G-U-N/Phased-Consistency-Model ``code/text_to_image_sd3/train_pcm_lora_sd3.py``'s training step is
written out below line by line (its EulerSolver over the scheduler's training σ, the phase ends of
``euler_style_multiphase_pred``, the frozen teacher's two guided calls c + w(c − u), the Euler step,
the LoRA transformer's no-grad target, the pseudo-Huber loss; its σ_prev table is float64, so its
steps round differently from the stock scheduler's float32 ones) on the tiny SD3 transformer, with the
inputs and the noise the method draws, and compared with the method's own loss at every phase edge,
next to each edge and at both ends of the grid, for several phase counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rapm_core.distill.method import Example, GuidedTeacher
from rapm_core.distill.trainer import Trainer
from rapm_core.ode import SlotGrid
from rapm_core.teacher import encode_prompts, load_teacher, load_unet
from rapm_testing.helpers import method_config
from rapm_testing.tiny_sd3 import build_tiny_sd3, load_tiny_sd3

K = 50  # the script's --num_euler_timesteps
W = 3.0  # the script's hard-coded teacher guidance: c + w·(c − u), i.e. CFG scale 1 + w
HUBER_C = 0.001  # the script's --huber_c
T5_TOKENS = 8


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    teacher_dir = build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "teacher", with_t5=False)
    teacher = load_teacher(teacher_dir, max_sequence_length=T5_TOKENS)
    cond, uncond = encode_prompts(teacher, ["a red circle"]), encode_prompts(teacher, [""])
    return teacher_dir, load_tiny_sd3(teacher_dir).scheduler.config, cond, uncond


def _pcm_trainer(teacher_dir, scheduler_config, phases: int, uncond) -> Trainer:
    trainer = Trainer(load_unet(teacher_dir, kind="sd3"), scheduler_config, SlotGrid.from_scheduler(
        scheduler_config, phases, 1), method_config(method="pcm", teacher_guidance=(1 + W, 1 + W)),
        teacher=GuidedTeacher(uncond, guidance=1 + W))
    g = torch.Generator().manual_seed(1)  # a student clearly different from its teacher
    trainer.load_trainable_state_dict({k: 0.05 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v
                                       for k, v in trainer.trainable_state_dict().items()})
    return trainer


def _seed_drawing(index: int) -> int:
    return next(s for s in range(5000)
                if int(torch.randint(K, (1,), generator=torch.Generator().manual_seed(s))) == index)


def _script_step(transformer, scheduler_config, phases, x0, cond, uncond, seed):
    """train_pcm_lora_sd3.py's step, in its own arithmetic (batch 1, fp32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    T = noise_scheduler.config.num_train_timesteps
    # EulerSolver(noise_scheduler.sigmas.numpy()[::-1], T, euler_timesteps=K)
    train_sigmas = noise_scheduler.sigmas.numpy()[::-1]
    euler_timesteps = (np.arange(1, K + 1) * (T // K)).round().astype(np.int64) - 1
    sigmas = torch.from_numpy(train_sigmas[euler_timesteps].copy())
    # a list of Python floats: float64, so the script's Euler steps run in float64 (on float32 values)
    sigmas_prev = torch.from_numpy(np.asarray([train_sigmas[0]] + train_sigmas[euler_timesteps[:-1]].tolist()))

    # the method's draws from the run's generator: the index, then the noise (the script: randint, randn_like)
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(K, (1,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    sigma, sigma_prev = sigmas[index].reshape(-1, 1, 1, 1), sigmas_prev[index].reshape(-1, 1, 1, 1)
    timesteps, timesteps_prev = (sigma * T).reshape(-1), (sigma_prev * T).reshape(-1)
    noisy_model_input = sigma * noise + (1.0 - sigma) * x0

    def call(x, t, c):
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=c.prompt_embeds,
                           pooled_projections=c.pooled_prompt_embeds, return_dict=False)[0]

    def multiphase(sample, model_pred, is_target):  # euler_style_multiphase_pred
        edges = torch.from_numpy(np.floor(np.linspace(0, K, num=phases, endpoint=False)).astype(np.int64))
        valid = index.unsqueeze(1).expand(-1, edges.size(0)) >= edges
        end = edges[edges.size(0) - 1 - valid.flip(dims=[1]).long().argmax(dim=1)]
        s = (sigmas_prev if is_target else sigmas)[index].reshape(-1, 1, 1, 1)
        return sample + (sigmas_prev[end].reshape(-1, 1, 1, 1) - s) * model_pred

    model_pred = multiphase(noisy_model_input, call(noisy_model_input, timesteps, cond), False)
    with torch.no_grad():
        transformer.disable_adapters()  # the script's frozen teacher_transformer
        cond_out, uncond_out = call(noisy_model_input, timesteps, cond), call(noisy_model_input, timesteps, uncond)
        transformer.enable_adapters()
        teacher_output = cond_out + W * (cond_out - uncond_out)
        x_prev = noisy_model_input + (sigma_prev - sigma) * teacher_output  # solver.euler_step
        target = multiphase(x_prev, call(x_prev.float(), timesteps_prev, cond), True)
    loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + HUBER_C ** 2) - HUBER_C)
    return int(index), noisy_model_input, x_prev, loss


@pytest.mark.parametrize("phases", [1, 2, 4, 8])
def test_pcm_on_sd3_computes_the_published_sd3_scripts_loss(sd3, phases):
    teacher_dir, scheduler_config, cond, uncond = sd3
    trainer = _pcm_trainer(teacher_dir, scheduler_config, phases, uncond)
    pcm = trainer.method
    x0 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    example = Example(torch.zeros(1, 16, 16, 16), cond, 0, x0)
    edges = [int(e) for e in np.floor(np.linspace(0, K, phases, endpoint=False))]
    assert pcm.edges == edges
    indices = sorted({0, K - 1, *edges, *(e - 1 for e in edges if e > 0), *(e + 1 for e in edges if e + 1 < K)})
    losses = []
    for index in indices:
        seed = _seed_drawing(index)
        drawn, x_plus, x_teacher, want = _script_step(trainer.unet, scheduler_config, phases, x0, cond, uncond, seed)
        draw = pcm.draw(example, torch.Generator().manual_seed(seed))
        assert draw.index == drawn == index
        torch.testing.assert_close(draw.x_plus, x_plus, rtol=0, atol=0)
        torch.testing.assert_close(draw.x_teacher, x_teacher.float(), rtol=0, atol=2e-5)
        got = float(next(pcm.losses(example, torch.Generator().manual_seed(seed))).generator["pcm_pointwise"].detach())
        assert got == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-8), (phases, index)
        losses.append(got)
    assert min(losses) > 0 and max(losses) > 2 * HUBER_C  # beyond c: the pseudo-Huber compares real differences


def test_pcm_adversarial_on_sd3_reads_the_joint_blocks_in_the_scripts_window(sd3):
    """train_pcm_lora_sd3_adv.py draws t′ as σ_prev at a grid index in [e, e + K/P) above the phase
    edge e; the method's window [s, level_above(s)) holds every such σ. An adversarial PCM step on
    the transformer trains the LoRA and the heads on the joint blocks' features."""
    teacher_dir, scheduler_config, cond, uncond = sd3
    phases = 4
    trainer = Trainer(load_unet(teacher_dir, kind="sd3"), scheduler_config,
                      SlotGrid.from_scheduler(scheduler_config, phases, 1),
                      method_config(method="pcm", pcm_adversarial=True, disc_schedule="simultaneous",
                                    disc_channels=8), teacher=GuidedTeacher(uncond, guidance=1 + W))
    pcm, ode = trainer.method, trainer.student.ode
    sigmas_prev = pcm.solver.previous
    for edge in pcm.edges:
        s = sigmas_prev[edge]
        assert s == pcm.phase_end(edge)
        assert all(s <= sigmas_prev[i] < ode.level_above(s, phases) for i in range(edge, edge + K // phases))
    example = Example(torch.zeros(1, 16, 16, 16), cond, 0,
                      torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3)))
    before = trainer.trainable_state_dict()
    metrics = trainer.train_step(example, torch.Generator().manual_seed(0), 1)
    after = trainer.trainable_state_dict()
    assert {"pcm_pointwise", "pcm_adv", "d_loss_pcm"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    heads = [k for k in after if k.startswith("disc_")]
    assert len(trainer.method.discriminators.taps.channels) == len(trainer.unet.transformer_blocks)
    assert any(not torch.equal(after[k], before[k]) for k in heads)
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)
