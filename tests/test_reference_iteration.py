"""The one-screen RAPM iteration (``rapm_core/distill/reference.py``) against the Trainer, and the
batched relative targets against one student call per slot."""

import pytest
import torch

from rapm_core.distill.reference import rapm_iteration
from rapm_core.distill.rapm import slot_targets
from rapm_testing.helpers import grid_for, make_distiller, teacher_trajectory

CASES = {
    "pointwise": dict(loss_relative="pointwise", loss_absolute="pointwise"),
    "adversarial": dict(loss_relative="adversarial", loss_absolute="adversarial", lambda_adv=0.5, lambda_rel=2.0),
    "both, alternating": dict(loss_relative="both", loss_absolute="adversarial", disc_schedule="alternate",
                              gen_loss="linear", pointwise="l2"),
    "absolute only, random slot": dict(loss_relative="off", loss_absolute="both", slots_per_iteration="random"),
}


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir):
    grid = grid_for(tiny_sd15_dir, 3, 2)
    return grid, [teacher_trajectory(tiny_sd15_dir, grid, seed=s) for s in (0, 1)]


@pytest.mark.parametrize("case", CASES)
def test_the_reference_iteration_is_the_trainers_bit_for_bit(case, tiny_sd15_dir, setup):
    grid, examples = setup
    trainer = make_distiller(tiny_sd15_dir, grid, **CASES[case])
    twin = make_distiller(tiny_sd15_dir, grid, **CASES[case])
    taps = twin.method.discriminators.taps if twin.method.discriminators is not None else None
    ours, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for it in range(4):
        example = examples[it % 2]
        metrics = trainer.train_step(example, ours, iteration=it)
        total = rapm_iteration(twin.student, grid, twin.config, example, reference, twin.heads, taps,
                               twin.g_optimizer, twin.d_optimizer, iteration=it)
        assert total == metrics["total"]
        a, b = trainer.trainable_state_dict(), twin.trainable_state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"iteration {it}"
    assert torch.equal(ours.get_state(), reference.get_state())
    for opt, twin_opt in ((trainer.g_optimizer, twin.g_optimizer), (trainer.d_optimizer, twin.d_optimizer)):
        if opt is not None:  # AdamW's moments: the gradients of every step were the same
            a, b = opt.state_dict()["state"], twin_opt.state_dict()["state"]
            assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    moved = trainer.trainable_state_dict()
    assert any(moved[k].abs().sum() > 0 for k in moved if ".lora_B." in k)  # it trained: B left zero


def test_batched_relative_targets_equal_one_call_per_slot(tiny_sd15_dir, setup):
    grid, (example, _) = setup
    trainer = make_distiller(tiny_sd15_dir, grid, loss_relative="pointwise")
    trainer.load_trainable_state_dict({k: (torch.randn_like(v) * 0.05 if ".lora_B." in k else v)
                                       for k, v in trainer.trainable_state_dict().items()})  # a student ≠ teacher
    student, slots = trainer.student, [2, 1, 0]
    batched = trainer.method.relative_targets(example.positions, example.cond, slots)
    for n, target in zip(slots, batched):
        t = slot_targets(example.positions, grid, n, 1)
        with torch.no_grad():
            one = student.jump(t.relative_start, t.relative_time, grid.slot_end(n), example.cond)
        torch.testing.assert_close(target, one, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(one, t.relative_start, atol=1e-2)  # a real jump, not the start
