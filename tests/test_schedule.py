import pytest
import torch

from rapm_core.ode import SlotGrid
from rapm_core.ode.vp import ddim_step, inference_scheduler, previous_timestep, renoise, alpha_bar
from rapm_testing.tiny_teacher import _scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [4, 12, 20, 40])
def test_ddim_step_equals_diffusers(prediction_type, num_steps):
    sched = inference_scheduler(_scheduler(prediction_type).config, num_steps)
    g = torch.Generator().manual_seed(num_steps)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps.tolist():
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x).prev_sample
        mine = ddim_step(x, out, t, previous_timestep(t, num_steps), sched.alphas_cumprod, prediction_type)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (4, 5), (4, 10), (8, 20), (3, 7)])
def test_fine_grid_contains_coarse_grid(n, m):
    grid = SlotGrid.from_scheduler(_scheduler("epsilon").config, n, m)
    assert len(grid.fine) == n * m and len(grid.coarse) == n
    for slot in range(n):
        assert grid.fine[grid.relative_index(slot, 0)] == grid.slot_start(slot)


def test_slot_indices_follow_rapm_notation():
    grid = SlotGrid.from_scheduler(_scheduler("epsilon").config, 4, 5)
    assert grid.coarse == (999, 749, 499, 249)
    assert [grid.slot_end(n) for n in (3, 2, 1, 0)] == [749, 499, 249, -1]
    assert grid.absolute_index(3) == 5 and grid.absolute_index(0) == 20
    assert grid.relative_index(3, 1) == 1 and grid.relative_index(0, 1) == 16
    assert grid.relative_time(3, 1) == 949
    with pytest.raises(ValueError):
        grid.relative_index(0, 5)


def test_clean_end_uses_alpha_zero_and_renoise_matches_add_noise():
    sched = inference_scheduler(_scheduler("epsilon").config)
    ac = sched.alphas_cumprod
    assert alpha_bar(ac, -1) == ac[0]
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    # Re-noising from the clean end's level ᾱ_0 to t equals add_noise from a sample at ᾱ_0.
    a0 = ac[0]
    x_at_0 = a0.sqrt() * x0  # noiseless component only
    out = renoise(x_at_0, 0, 500, torch.zeros_like(noise), ac)
    torch.testing.assert_close(out, ac[500].sqrt() * x0)
