"""The ODE interface's two families against diffusers' own schedulers: rectified flow stepped as
``FlowMatchEulerDiscreteScheduler`` steps it (through the SD3 pipeline's own ``retrieve_timesteps``),
its grids, its re-noising in distribution; VP re-noising against ``DDPMScheduler.add_noise``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from rapm_core.conditioning import Conditioning
from rapm_core.errors import ConfigError
from rapm_core.ode import RectifiedFlow, SlotGrid, VpDdim, ode_for
from rapm_core.flow_grid import pre_shift_sigmas, stock_sigmas
from rapm_core.sampler import ode_sample, sample_stock
from rapm_testing.tiny_teacher import _scheduler

SHAPE = (2, 4, 8, 8)


class FixedField(torch.nn.Module):
    """A weightless network, v(x, t, c): samplers stepping it differ only in their arithmetic."""

    def forward(self, sample, timestep, encoder_hidden_states=None):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, *([1] * (sample.ndim - 1)))
        c = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=torch.tanh(sample) * 0.7 - 0.3 * (t / 1000.0) + c)


def _cond(seed: int = 0) -> Conditioning:
    return Conditioning(torch.randn(SHAPE[0], 3, 8, generator=torch.Generator().manual_seed(seed)))


def _flow_config(shift: float = 3.0) -> dict:
    return dict(FlowMatchEulerDiscreteScheduler(shift=shift).config)


def _stock_flow_loop(config: dict, sigmas: list[float], latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """What ``StableDiffusion3Pipeline(..., sigmas=sigmas, guidance_scale=1.0)`` does after encoding:
    ``retrieve_timesteps`` then, per timestep, the network on ``t.expand(B)`` and the scheduler's step."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    timesteps, _ = retrieve_timesteps(scheduler, None, "cpu", sigmas=sigmas)
    field, z, positions = FixedField(), latents, [latents]
    for t in timesteps:
        v = field(z, t.expand(z.shape[0]), cond.prompt_embeds).sample
        z = scheduler.step(v, t, z).prev_sample
        positions.append(z)
    return torch.stack(positions, dim=1)


def test_the_family_comes_from_the_scheduler_config():
    assert isinstance(ode_for(_flow_config()), RectifiedFlow)
    assert isinstance(ode_for({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}), RectifiedFlow)
    assert isinstance(ode_for(_scheduler("epsilon").config), VpDdim)
    assert isinstance(ode_for(dict(PNDMScheduler().config)), VpDdim)
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        ode_for(dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_the_flow_student_grid_wastes_no_step(shift, n):
    sigmas = RectifiedFlow(_flow_config(shift)).sigmas(n)
    pre = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), shift * pre / (1 + (shift - 1) * pre),
                               rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and pre_shift_sigmas(n) == pre[:-1].tolist()
    # The stock default N-step grid's last step starts at σ ≈ 1/T: nearly a wasted network call.
    stock = FlowMatchEulerDiscreteScheduler(shift=shift)
    stock.set_timesteps(n)
    if n > 1:
        assert float(stock.sigmas[-2]) < 0.01 < sigmas[-2]


@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (4, 5), (3, 7), (8, 20)])
def test_the_flow_fine_grid_contains_the_student_grid(n, m):
    grid = SlotGrid.from_scheduler(_flow_config(), n, m)
    assert len(grid.fine) == n * m and len(grid.coarse) == n
    for slot in range(n):
        assert grid.fine[grid.relative_index(slot, 0)] == grid.slot_start(slot)
    assert grid.slot_end(0) == 0.0 and grid.boundary_times()[0] == 1.0
    assert stock_sigmas(n, m) == pre_shift_sigmas(n * m) and len(stock_sigmas(n, m)) == n * m


@pytest.mark.parametrize("n,m", [(2, 3), (4, 2)])
def test_flow_sampling_equals_the_stock_scheduler_with_the_exported_sigmas(n, m):
    config, cond = _flow_config(), _cond()
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n))
    ode = RectifiedFlow(config)
    # The stored trajectory: every fine position, against the stock call with stock_sigmas.
    ours = ode_sample(FixedField(), ode, latents, cond, n * m, return_positions=True)
    stock = _stock_flow_loop(config, stock_sigmas(n, m), latents, cond)
    assert (ours - stock).abs().max() <= 1e-6
    # The student's N steps: the exported sampler (scheduler + sigmas=) equals RAPM's own steps.
    sampler = ode.stock_sampler(n)
    assert sampler.class_name == "FlowMatchEulerDiscreteScheduler" and sampler.timestep_kwargs == {
        "sigmas": pre_shift_sigmas(n)}
    student = ode_sample(FixedField(), ode, latents, cond, n)
    assert (sample_stock(FixedField(), sampler, latents, cond) - student).abs().max() <= 1e-6
    assert (_stock_flow_loop(config, sampler.timestep_kwargs["sigmas"], latents, cond)[:, -1] - student).abs().max() <= 1e-6


def test_flow_x0_and_the_step_agree_with_the_interpolation():
    ode = RectifiedFlow(_flow_config())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x = ode.noise(x0, 0.6, eps)
    v = eps - x0  # the exact velocity of the straight path
    torch.testing.assert_close(ode.predict_x0(x, v, 0.6), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ode.step(x, v, 0.6, 0.25), ode.noise(x0, 0.25, eps), rtol=0, atol=1e-6)
    torch.testing.assert_close(ode.step_x0(x, ode.step(x, v, 0.6, 0.25), 0.6, 0.25), x0, rtol=0, atol=1e-5)
    assert ode.network_time(0.6) == FlowMatchEulerDiscreteScheduler().config.num_train_timesteps * torch.tensor(0.6)
    # per-sample levels (a batch of slots)
    levels = torch.tensor([0.6, 0.3])
    torch.testing.assert_close(ode.noise(x0, levels, eps)[1], ode.noise(x0[1:], 0.3, eps[1:])[0])


def test_a_constant_velocity_field_is_integrated_exactly_by_euler_and_dpm_solver():
    ode, cond = RectifiedFlow(_flow_config()), _cond()

    class Constant(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None):
            return SimpleNamespace(sample=torch.full_like(sample, 0.5))

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for n in (1, 2, 4):
        torch.testing.assert_close(ode_sample(Constant(), ode, latents, cond, n), latents - 0.5, rtol=0, atol=1e-5)
        # diffusers' flow DPM-Solver++ starts at its grid's first σ, shift(1 − 1/T) < 1, not at 1: a
        # misconfigured one (ε instead of velocity, no shift) lands orders of magnitude further off.
        torch.testing.assert_close(sample_stock(Constant(), ode.dpm_solver(n), latents, cond), latents - 0.5,
                                   rtol=0, atol=1e-3)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=0), x.std(dim=0)


@pytest.mark.parametrize("a,b", [(0.0, 0.5), (0.2, 0.7), (0.5, 0.95), (0.3, 0.3)])
def test_flow_renoise_is_the_forward_process_in_distribution(a, b):
    """x0 → σ_a (stock ``scale_noise``) → σ_b (renoise) against x0 → σ_b directly (stock): equal mean
    and spread per element; both are Gaussian, so equal distributions."""
    ode, g = RectifiedFlow(_flow_config()), torch.Generator().manual_seed(3)
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(sigmas=[1.0, 0.0])  # scale_noise reads the level off its timestep table
    draws, x0 = 200_000, torch.tensor([-1.5, 0.0, 0.8, 2.0])
    x0s = x0.expand(draws, 4)

    def at(sigma: float, noise: torch.Tensor) -> torch.Tensor:
        stock.sigmas = torch.tensor([sigma, 0.0])
        stock.timesteps = stock.sigmas[:1] * 1000
        stock._step_index = None
        return stock.scale_noise(x0s, stock.timesteps[:1], noise)

    direct = at(b, torch.randn(draws, 4, generator=g))
    composed = ode.renoise(at(a, torch.randn(draws, 4, generator=g)), a, b, torch.randn(draws, 4, generator=g))
    (m1, s1), (m2, s2) = _moments(direct), _moments(composed)
    torch.testing.assert_close(m2, m1, rtol=0, atol=0.02)
    torch.testing.assert_close(s2, s1, rtol=0.01, atol=1e-3)
    torch.testing.assert_close(m1, (1 - b) * x0, rtol=0, atol=0.02)  # the stock side is what it says


@pytest.mark.parametrize("t_a,t_b", [(0, 500), (100, 700), (400, 999), (-1, 300)])
def test_vp_renoise_is_ddpm_add_noise_composed(t_a, t_b):
    """x0 → t_a (stock ``DDPMScheduler.add_noise``) → t_b (renoise) against add_noise to t_b directly:
    the ratio arithmetic exactly, and the distribution."""
    stock = DDPMScheduler.from_config(_scheduler("epsilon").config)
    ode, ac = VpDdim(_scheduler("epsilon").config), stock.alphas_cumprod.double()
    g = torch.Generator().manual_seed(t_b)
    x = torch.randn(3, 4, generator=g)
    noise = torch.randn(3, 4, generator=g)
    ratio = ac[t_b] / ac[max(t_a, 0)]
    torch.testing.assert_close(ode.renoise(x, t_a, t_b, noise).double(), ratio.sqrt() * x.double() + (1 - ratio).sqrt() * noise.double(),
                               rtol=0, atol=1e-6)

    draws, x0 = 200_000, torch.tensor([-1.5, 0.0, 0.8, 2.0])
    x0s = x0.expand(draws, 4)

    def add_noise(t: int) -> torch.Tensor:
        if t < 0:  # the clean end's level is ᾱ_0 (set_alpha_to_one=False)
            t = 0
        return stock.add_noise(x0s, torch.randn(draws, 4, generator=g), torch.full((draws,), t))

    direct = add_noise(t_b)
    composed = ode.renoise(add_noise(t_a), t_a, t_b, torch.randn(draws, 4, generator=g))
    (m1, s1), (m2, s2) = _moments(direct), _moments(composed)
    torch.testing.assert_close(m2, m1, rtol=0, atol=0.02)
    torch.testing.assert_close(s2, s1, rtol=0.01, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_the_vp_students_jumps_are_the_exported_ddim_samplers_steps(prediction_type, n):
    """What the student is trained with (the ODE's N steps) is what ships (the stock DDIMScheduler)."""
    ode, cond = VpDdim(_scheduler(prediction_type).config), _cond()
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n))
    sampler = ode.stock_sampler(n)
    assert sampler.class_name == "DDIMScheduler" and sampler.timestep_kwargs == {}
    own = ode_sample(FixedField(), ode, latents, cond, n, return_positions=True)
    stock = sample_stock(FixedField(), sampler, latents, cond, return_positions=True)
    assert (own - stock).abs().max() <= 1e-5
