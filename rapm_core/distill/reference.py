"""One RAPM iteration written out as a single loop: the method in one screen.

Read this first. ``Rapm`` (rapm.py), ``Discriminators`` (adversarial.py) and ``Trainer``
(trainer.py) compute exactly this, split into the pieces every method shares; a test holds them
bit-identical to it (``tests/test_reference_iteration.py``), for pointwise and adversarial losses.
What the pieces add and this leaves out: mixed precision and its loss scaling, the non-finite
guard, logging.

The notation is RAPM.md's: the stored teacher trajectory Z (``positions``), N slots of M fine
steps, slot n running from t_{n+1} down to t_n.
"""

from __future__ import annotations

import math

import torch

from rapm_core.distill.config import MethodConfig
from rapm_core.distill.discriminator import FeatureTaps
from rapm_core.distill.losses import discriminator_hinge_loss, generator_adversarial_loss, pointwise_loss
from rapm_core.distill.method import Example
from rapm_core.distill.student import Student
from rapm_core.ode import SlotGrid


def rapm_iteration(student: Student, grid: SlotGrid, config: MethodConfig, example: Example,
                   generator: torch.Generator, heads: torch.nn.ModuleDict, taps: FeatureTaps | None,
                   g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer | None, iteration: int = 0) -> float:
    """One optimizer step of the LoRA (and of the heads, one set per adversarial kind: "rel",
    "abs") on one trajectory; returns the weighted objective summed over the slots."""
    rapm, adv, training = config.rapm, config.adversarial, config.training
    Z = example.positions.to(student.device, torch.float32)
    cond = example.cond.to(student.device, student.dtype)
    lora, disc = student.lora_params, list(heads.parameters())
    ode = student.ode  # the teacher's ODE: its levels, its re-noising
    N, M, d = grid.num_slots, grid.steps_per_slot, rapm.relative_offset
    # PCM's alternating schedule: the heads step on even iterations, the LoRA on odd ones.
    alternate = d_opt is not None and adv.disc_schedule == "alternate"
    g_steps, d_steps = (iteration % 2 == 1, iteration % 2 == 0) if alternate else (True, d_opt is not None)
    g_opt.zero_grad(set_to_none=True)
    if d_opt is not None:
        d_opt.zero_grad(set_to_none=True)

    z, slots = Z[0:1], list(range(N - 1, -1, -1))  # the student starts from the teacher's noise z_N = Z[0]
    if rapm.slots_per_iteration == "random":  # one slot: roll the student there without gradients
        chosen = int(torch.randint(N, (1,), generator=generator))
        with torch.no_grad():
            for n in range(N - 1, chosen, -1):
                z = student.jump(z, grid.slot_start(n), grid.slot_end(n), cond)
        slots = [chosen]

    # Relative targets ẑ_n: the student's jump from the teacher's point d fine steps into slot n,
    # Z[(N−1−n)·M + d] at τ, to t_n. They do not depend on the student's chain: one batched call.
    relative = None
    if rapm.loss_relative != "off":
        with torch.no_grad():
            starts = torch.cat([Z[(N - 1 - n) * M + d].unsqueeze(0) for n in slots])
            taus = torch.tensor([grid.fine[(N - 1 - n) * M + d] for n in slots], device=student.device)
            ends = torch.tensor([grid.slot_end(n) for n in slots], device=student.device)
            relative = student.jump(starts, taus, ends, cond[[0] * len(slots)])

    kinds = list(heads)  # the adversarial kinds ("rel", "abs" or one of them), in their heads' order
    total = 0.0
    for i, n in enumerate(slots):
        t_start, t_end = grid.slot_start(n), grid.slot_end(n)
        fake = student.jump(z, t_start, t_end, cond)  # z^φ_n, with gradient into the LoRA
        absolute = Z[(N - n) * M].unsqueeze(0)  # z̃_n, the teacher's stored position at t_n
        real = {"rel": None if relative is None else relative[i:i + 1], "abs": absolute}
        g_loss, d_loss = 0, 0
        if kinds:  # re-noise fake and reals with one noise to one t′ ∈ [t_n, t_{n+1}); read the frozen teacher
            t_prime = ode.draw_level(t_end, t_start, generator)
            noise = torch.randn(fake.shape, generator=generator).to(student.device)
            fake_feats = taps(ode.renoise(fake, t_end, t_prime, noise), ode.network_time(t_prime), cond)
            with torch.no_grad():
                reals = torch.cat([real[k] for k in kinds])
                real_feats = taps(ode.renoise(reals, t_end, t_prime, noise), ode.network_time(t_prime),
                                  cond[[0] * len(kinds)])
            for row, kind in enumerate(kinds):  # hinge: G through the backbone, D on detached features
                g = generator_adversarial_loss(heads[kind](fake_feats), adv.gen_loss)
                g_loss = g_loss + rapm.weight(kind) * adv.lambda_adv * g
                d_loss = d_loss + discriminator_hinge_loss(heads[kind]([f[row:row + 1] for f in real_feats]),
                                                           heads[kind]([f.detach() for f in fake_feats]))
        for kind in ("rel", "abs"):
            if rapm.pointwise_on(kind):
                p = pointwise_loss(fake, real[kind], config.pointwise.pointwise, config.pointwise.huber_c)
                g_loss = g_loss + rapm.weight(kind) * p

        if g_steps:  # each slot's graph is freed by its own backward; gradients sum over slots
            g_loss.backward(inputs=lora)
        if kinds and d_steps:
            d_loss.backward(inputs=disc)
        total += float(g_loss.detach())
        z = fake.detach()  # z_n = detach(z^φ_n): no gradient crosses a slot boundary

    # Clip each optimizer's gradients (global norm), then step: once per iteration.
    clip = training.grad_clip if training.grad_clip is not None else math.inf
    stepping = [(opt, params) for on, opt, params in ((g_steps, g_opt, lora), (d_steps, d_opt, disc)) if on]
    for _, params in stepping:
        torch.nn.utils.clip_grad_norm_(params, clip)
    for opt, _ in stepping:
        opt.step()
    return total
