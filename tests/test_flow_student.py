"""RAPM written once against the ODE interface, run on a rectified-flow ODE: the tiny UNet read as a
velocity network under a FlowMatchEulerDiscreteScheduler config (the SD3 transformer is the next
adapter; the method's arithmetic is what is checked here)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rapm_core.distill.method import Example, GuidedTeacher
from rapm_core.distill.trainer import Trainer
from rapm_core.errors import ConfigError
from rapm_core.evaluate.student import load_student_export
from rapm_core.ode import RectifiedFlow, SlotGrid
from rapm_core.flow_grid import pre_shift_sigmas
from rapm_core.sampler import ode_sample
from rapm_testing.helpers import LATENT, load_unet, method_config, random_cond

FLOW = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)


def _randomised(trainer: Trainer) -> Trainer:
    state = trainer.trainable_state_dict()
    g = torch.Generator().manual_seed(1)
    trainer.load_trainable_state_dict({k: 0.05 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v
                                       for k, v in state.items()})
    return trainer


def _flow_example(teacher_dir, grid: SlotGrid) -> Example:
    unet, cond = load_unet(teacher_dir), random_cond(load_unet(teacher_dir), seed=0)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(100))
    positions = ode_sample(unet, grid.ode, noise, cond, grid.total_steps, return_positions=True)[0]
    return Example(positions=positions, cond=cond, index=0)


@pytest.mark.parametrize("loss", ["pointwise", "adversarial"])
def test_rapm_trains_on_a_flow_ode_and_its_jumps_are_euler_steps(tiny_sd15_dir, loss):
    grid = SlotGrid.from_scheduler(FLOW, 2, 2)
    trainer = _randomised(Trainer(load_unet(tiny_sd15_dir), FLOW, grid,
                                  method_config(loss_relative=loss, loss_absolute=loss)))
    student = trainer.student
    assert isinstance(student.ode, RectifiedFlow)
    example = _flow_example(tiny_sd15_dir, grid)
    z, cond = example.positions[:1], example.cond
    # One student jump is x + (σ_to − σ_from)·v with v the network at t = 1000·σ_from.
    with torch.no_grad():
        v = trainer.unet(z, torch.tensor(grid.slot_start(1)) * 1000, encoder_hidden_states=cond.prompt_embeds).sample
        jump = student.jump(z, grid.slot_start(1), grid.slot_end(1), cond)
    torch.testing.assert_close(jump, z + (grid.slot_end(1) - grid.slot_start(1)) * v, rtol=0, atol=1e-6)
    metrics = trainer.train_step(example, torch.Generator().manual_seed(0), 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    if loss == "adversarial":
        assert {"rel_adv", "abs_adv", "d_loss_rel"} <= set(metrics)


def test_a_flow_student_ships_its_sigmas_and_is_sampled_as_exported(tiny_sd15_dir, tmp_path):
    grid = SlotGrid.from_scheduler(FLOW, 3, 2)
    trainer = _randomised(Trainer(load_unet(tiny_sd15_dir), FLOW, grid, method_config(loss_relative="pointwise",
                                                                                      loss_absolute="pointwise")))
    export = trainer.export(tmp_path / "export", teacher=str(tiny_sd15_dir), model_card={})
    info = json.loads((export / "inference.json").read_text())
    assert info["scheduler"] == "FlowMatchEulerDiscreteScheduler" and info["num_inference_steps"] == 3
    assert info["set_timesteps"] == {"sigmas": pre_shift_sigmas(3)} == {"sigmas": [1.0, 2 / 3, 1 / 3]}
    assert f"sigmas={json.dumps(pre_shift_sigmas(3))}" in (export / "README.md").read_text()
    student = load_student_export(export)
    shipped = trainer.method.stock_sampler()
    assert (student.sampler.num_steps, student.sampler.timestep_kwargs) == (shipped.num_steps, shipped.timestep_kwargs)
    assert student.sampler.scheduler().config == shipped.scheduler().config
    # The one sampling path (the exported scheduler with sigmas=) equals the student's own Euler steps.
    cond, latents = random_cond(trainer.unet, seed=3), torch.randn(LATENT, generator=torch.Generator().manual_seed(4))
    ours = trainer.sample(latents, cond)
    own = ode_sample(trainer.unet, grid.ode, latents, cond, 3)
    assert (ours - own).abs().max() <= 1e-6 and (ours - latents).abs().max() > 0.1


def test_lcm_refuses_a_flow_teacher_in_one_line(tiny_sd15_dir):
    """LCM-LoRA's boundary scalings and LCMScheduler are VP-DDIM's (PCM runs on flow: test_pcm_sd3_published)."""
    cond = random_cond(load_unet(tiny_sd15_dir))
    with pytest.raises(ConfigError, match="rectified-flow"):
        Trainer(load_unet(tiny_sd15_dir), FLOW, SlotGrid.from_scheduler(FLOW, 2, 2), method_config(method="lcm"),
                teacher=GuidedTeacher(cond, 3.0))
