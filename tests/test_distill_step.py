import pickle

import pydantic
import pytest
import torch

from rapm_core.distill.config import MethodConfig
from rapm_core.distill.method import Example
from rapm_core.distill.rapm import slot_targets
from rapm_core.distill.trainer import NonFiniteLossError, Trainer
from rapm_core.errors import ConfigError
from rapm_core.sampler import ode_sample
from rapm_testing.helpers import (grid_for, load_unet, make_distiller, method_config, scheduler_config,
                                  teacher_trajectory)


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir):
    grid = grid_for(tiny_sd15_dir, 2, 2)
    return grid, teacher_trajectory(tiny_sd15_dir, grid)


@pytest.fixture(scope="module", params=["tiny_sd15_dir", "tiny_sd3_dir"], ids=["unet", "sd3"])
def teacher_setup(request):
    """(teacher dir, grid, trajectory) of a UNet teacher and of an SD3-class transformer teacher,
    for what must hold on both."""
    teacher_dir = request.getfixturevalue(request.param)
    grid = grid_for(teacher_dir, 2, 2)
    return teacher_dir, grid, teacher_trajectory(teacher_dir, grid)


@pytest.fixture(scope="module")
def setup3(tiny_sd15_dir):
    """Three slots, for what needs a slot between the first and the last."""
    grid = grid_for(tiny_sd15_dir, 3, 2)
    return grid, teacher_trajectory(tiny_sd15_dir, grid)


def _record_unet_calls(unet):
    """(t, input sample, grad enabled) of every UNet call the step makes; a batched call with
    one time per row counts as one call per row."""
    calls = []

    def record(_module, args, _kwargs):
        sample, times = args[0].detach().clone(), torch.as_tensor(args[1]).reshape(-1).expand(args[0].shape[0])
        calls.extend((int(t), sample[i:i + 1], torch.is_grad_enabled()) for i, t in enumerate(times))

    unet.register_forward_pre_hook(record, with_kwargs=True)
    return calls


def _student_positions(tiny_sd15_dir, grid, example):
    """The N-step trailing DDIM chain of the (still untrained, = teacher) student from Z[0]."""
    return ode_sample(load_unet(tiny_sd15_dir), scheduler_config(tiny_sd15_dir), example.positions[:1],
                       example.cond, grid.num_slots, return_positions=True)[0]


def test_slot_targets_read_the_stored_indices(tiny_sd15_dir):
    grid = grid_for(tiny_sd15_dir, 3, 3)
    positions = torch.arange(grid.total_steps + 1, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 4, 2, 2)
    for d in range(3):
        for n in range(3):
            t = slot_targets(positions, grid, n, d)
            assert t.absolute.shape == t.relative_start.shape == (1, 4, 2, 2)
            assert torch.all(t.absolute == (3 - n) * 3)  # z̃_n = Z[(N−n)·M]
            assert torch.all(t.relative_start == (3 - 1 - n) * 3 + d)  # ẑ^Δ_{n+1} = Z[(N−1−n)·M + d]
            assert t.relative_time == grid.fine[(3 - 1 - n) * 3 + d]
    assert slot_targets(positions, grid, 2, 1).relative_time == 999 - 1000 // 9


def test_student_starts_from_teacher_noise_and_jumps_from_stored_points(tiny_sd15_dir, setup3):
    grid, example = setup3
    dist = make_distiller(tiny_sd15_dir, grid, loss_relative="pointwise", loss_absolute="pointwise")
    calls = _record_unet_calls(dist.unet)
    dist.accumulate_gradients(example, torch.Generator().manual_seed(0))

    chain = _student_positions(tiny_sd15_dir, grid, example)
    student_calls = [(t, x) for t, x, grad in calls if grad]
    relative_calls = [(t, x) for t, x, grad in calls if not grad]
    # all relative jumps first, in one call: they start from stored positions, not the student's
    assert [grad for *_, grad in calls] == [False] * grid.num_slots + [True] * grid.num_slots
    assert [t for t, _ in student_calls] == [grid.slot_start(n) for n in (2, 1, 0)]
    assert torch.equal(student_calls[0][1], example.positions[:1])  # z_N = Z[0], the teacher's own noise
    for (_, x), k in zip(student_calls, range(grid.num_slots)):
        torch.testing.assert_close(x, chain[k:k + 1], rtol=0, atol=1e-5)  # z_{n+1} = detach(z^φ_{n+1})
    assert [t for t, _ in relative_calls] == [grid.relative_time(n, 1) for n in (2, 1, 0)]
    for (_, x), n in zip(relative_calls, (2, 1, 0)):
        assert torch.equal(x, example.positions[grid.relative_index(n, 1):grid.relative_index(n, 1) + 1])


def test_random_slot_mode_rolls_the_student_out_without_grad(tiny_sd15_dir, setup3):
    grid, example = setup3
    seed = next(s for s in range(100) if int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(s))) == 0)
    dist = make_distiller(tiny_sd15_dir, grid, slots_per_iteration="random", loss_absolute="pointwise",
                          loss_relative="pointwise")
    calls = _record_unet_calls(dist.unet)
    metrics = dist.accumulate_gradients(example, torch.Generator().manual_seed(seed))

    chain = _student_positions(tiny_sd15_dir, grid, example)
    # no-grad student through slots 2 and 1, the relative jump of slot 0, then slot 0's student step
    assert [(t, grad) for t, _, grad in calls] == [
        (grid.slot_start(2), False), (grid.slot_start(1), False), (grid.relative_time(0, 1), False),
        (grid.slot_start(0), True)]
    torch.testing.assert_close(calls[-1][1], chain[2:3], rtol=0, atol=1e-5)
    assert set(metrics) == {"total", "abs_pointwise", "rel_pointwise"}


def test_no_gradient_crosses_a_slot_boundary(tiny_sd15_dir, setup3):
    grid, example = setup3
    dist = make_distiller(tiny_sd15_dir, grid, loss_relative="both", loss_absolute="both")
    cond, gen = example.cond, torch.Generator().manual_seed(0)
    relative = dist.method.relative_targets(example.positions, cond, [2, 1])
    _, first = dist.method.slot_losses(example.positions[:1], example.positions, relative[0], cond, 2, gen)
    assert first.grad_fn is not None

    # feed slot 1 the un-detached student output of slot 2: its losses still do not depend on it
    second, _ = dist.method.slot_losses(first, example.positions, relative[1], cond, 1, gen)
    loss = sum(second.generator.values()) + sum(second.discriminator.values())
    assert torch.autograd.grad(loss, first, allow_unused=True) == (None,)
    assert set(second.generator) == {"rel_adv", "abs_adv", "rel_pointwise", "abs_pointwise"}


@pytest.mark.parametrize("fixture", ["tiny_sd15_dir", "tiny_sd15_vpred_dir", "tiny_sdxl_dir"])
def test_a_training_step_gives_finite_moved_parameters(fixture, request):
    teacher_dir = request.getfixturevalue(fixture)
    grid = grid_for(teacher_dir, 2, 2)
    example = teacher_trajectory(teacher_dir, grid)
    dist = make_distiller(teacher_dir, grid)  # make_distiller's: both losses adversarial
    before = dist.trainable_state_dict()
    metrics = dist.train_step(example, torch.Generator().manual_seed(0))
    after = dist.trainable_state_dict()

    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("disc_abs."))
    expected = {"total", "grad_norm", "grad_norm_disc"} | {
        f"{m}_{k}" for k in ("rel", "abs") for m in ("d_loss", "d_acc_real", "d_acc_fake")} | {"rel_adv", "abs_adv"}
    assert set(metrics) == expected and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_nonfinite_loss_raises_and_leaves_everything_unchanged(teacher_setup):
    teacher_dir, grid, example = teacher_setup
    bad = example.positions.clone()
    bad[grid.absolute_index(0)] = float("nan")  # slot 1 is fine and back-propagates first
    dist = make_distiller(teacher_dir, grid, loss_relative="adversarial", loss_absolute="pointwise")
    before, opt_before = dist.trainable_state_dict(), dist.optimizer_state_dict()

    with pytest.raises(NonFiniteLossError) as info:
        dist.train_step(Example(bad, example.cond, index=42), torch.Generator().manual_seed(0))
    err = info.value
    assert (err.index, err.slot, err.term) == (42, 0, "abs_pointwise")
    again = pickle.loads(pickle.dumps(err))  # flows ship exceptions between processes
    assert (again.index, again.slot, again.term) == (42, 0, "abs_pointwise")

    after = dist.trainable_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert dist.optimizer_state_dict() == opt_before  # no optimizer step taken
    assert all(p.grad is None for p in [*dist.lora_params, *dist.heads.parameters()])


def _run(tiny_sd15_dir, grid, example, steps, seed=5, **overrides):
    dist = make_distiller(tiny_sd15_dir, grid, **overrides)
    gen = torch.Generator().manual_seed(seed)
    metrics = [dist.train_step(example, gen) for _ in range(steps)]
    return dist, gen, metrics


def test_same_weights_and_seed_give_bit_identical_training(tiny_sd15_dir, setup):
    grid, example = setup
    a, _, ma = _run(tiny_sd15_dir, grid, example, 2, loss_relative="both")
    b, _, mb = _run(tiny_sd15_dir, grid, example, 2, loss_relative="both")
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert ma == mb
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_round_trip_continues_bit_identically(tiny_sd15_dir, setup):
    grid, example = setup
    original, gen, _ = _run(tiny_sd15_dir, grid, example, 1)
    saved = (original.trainable_state_dict(), original.optimizer_state_dict(), gen.get_state())
    continued = original.train_step(example, gen)

    resumed = make_distiller(tiny_sd15_dir, grid, init_seed=99)  # different init, overwritten by the load
    resumed.load_trainable_state_dict(saved[0])
    resumed.load_optimizer_state_dict(saved[1])
    gen2 = torch.Generator()
    gen2.set_state(saved[2])
    assert resumed.train_step(example, gen2) == continued
    so, sr = original.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(so[k], sr[k]) for k in so)


def test_heads_exist_only_for_adversarial_losses(tiny_sd15_dir, setup):
    grid, example = setup
    pointwise = dict(loss_relative="pointwise", loss_absolute="pointwise")
    original, _, _ = _run(tiny_sd15_dir, grid, example, 1, **pointwise)
    state, optimizer = original.trainable_state_dict(), original.optimizer_state_dict()
    assert len(original.heads) == 0 and set(optimizer) == {"generator"}
    assert state and not any(k.startswith("disc_") for k in state)
    continued = original.train_step(example, torch.Generator().manual_seed(1))
    resumed = make_distiller(tiny_sd15_dir, grid, init_seed=99, **pointwise)
    resumed.load_trainable_state_dict(state)
    resumed.load_optimizer_state_dict(optimizer)
    assert resumed.train_step(example, torch.Generator().manual_seed(1)) == continued

    one = make_distiller(tiny_sd15_dir, grid, loss_relative="pointwise", loss_absolute="adversarial")
    assert list(one.heads) == ["abs"]
    assert {k.split(".")[0] for k in one.trainable_state_dict() if k.startswith("disc_")} == {"disc_abs"}


def test_gradient_checkpointing_does_not_change_gradients(teacher_setup):
    teacher_dir, grid, example = teacher_setup
    grads, module_calls = [], []
    for checkpointing in (False, True):
        dist = make_distiller(teacher_dir, grid, gradient_checkpointing=checkpointing)
        # a student away from the teacher, so a backbone recomputed as the student would show
        state = dist.trainable_state_dict()
        g = torch.Generator().manual_seed(0)
        dist.load_trainable_state_dict({k: 0.1 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v
                                        for k, v in state.items()})
        calls = []
        for module in dist.unet.modules():
            module.register_forward_hook(lambda *_: calls.append(1))
        dist.accumulate_gradients(example, torch.Generator().manual_seed(0))
        grads.append([p.grad for p in [*dist.lora_params, *dist.heads.parameters()]])
        module_calls.append(len(calls))
    assert module_calls[1] > module_calls[0]  # checkpointing is on: the backward pass ran blocks again
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_pointwise_training_reduces_the_absolute_gap(tiny_sd15_dir, setup):
    grid, example = setup
    _, _, metrics = _run(tiny_sd15_dir, grid, example, 4, loss_relative="off", loss_absolute="pointwise", lr=1e-3)
    gaps = [m["abs_pointwise"] for m in metrics]
    assert all(b < a for a, b in zip(gaps, gaps[1:]))


def test_config_errors(tiny_sd15_dir, setup):
    grid, example = setup
    with pytest.raises(pydantic.ValidationError, match="nothing to train"):
        MethodConfig.from_options(loss_relative="off", loss_absolute="off")
    with pytest.raises(pydantic.ValidationError):
        MethodConfig.from_options(rank=0)
    with pytest.raises(pydantic.ValidationError):
        MethodConfig.from_options(lr=float("inf"))
    with pytest.raises(ConfigError, match="relative_offset"):
        make_distiller(tiny_sd15_dir, grid, relative_offset=2)
    with pytest.raises(ConfigError, match="CUDA"):
        make_distiller(tiny_sd15_dir, grid, mixed_precision="bf16")
    dist = make_distiller(tiny_sd15_dir, grid)
    with pytest.raises(ConfigError, match="positions"):
        dist.train_step(Example(example.positions[:-1], example.cond, 0), torch.Generator())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_step_on_cuda_keeps_fp32_trainables(tiny_sd15_dir):
    grid = grid_for(tiny_sd15_dir, 2, 2)
    example = teacher_trajectory(tiny_sd15_dir, grid)
    dist = Trainer(load_unet(tiny_sd15_dir), scheduler_config(tiny_sd15_dir), grid,
                   method_config(mixed_precision="bf16"), device="cuda")
    metrics = dist.train_step(example, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in [*dist.lora_params, *dist.heads.parameters()])
