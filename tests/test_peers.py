"""The consistency peers (PCM, LCM-LoRA) as methods: their grids and scalings against the published
scripts and diffusers, their online teacher step, their data, their CLI and their export."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

from flows.cli import build_parser
from flows.cli_model import model_from_args
from rapm_core.distill.config import DistillRunConfig, MethodConfig
from rapm_core.distill.consistency import SkippingGrid
from rapm_core.distill.data import load_example
from rapm_core.distill.method import Example, GuidedTeacher
from rapm_core.distill.renders import render_latents
from rapm_core.distill.run import run_config_hash, run_distillation
from rapm_core.distill.trainer import Trainer
from rapm_core.errors import ConfigError
from rapm_core.sampler import guided_prediction
from rapm_core.ode.vp import VpDdim, ddim_step, inference_scheduler
from rapm_shapes.assets import EMBEDDED_TEACHER
from rapm_shapes.shapes import all_prompts
from rapm_testing.helpers import LATENT, grid_for, load_unet, method_config, random_cond, run_config, scheduler_config
from storage.trajectory_store import TrajectoryStore


def _trainer(teacher_dir, n=4, m=2, **options) -> Trainer:
    cond = random_cond(load_unet(teacher_dir), seed=9)
    uncond = GuidedTeacher(type(cond)(torch.zeros_like(cond.prompt_embeds)), guidance=3.0)
    return Trainer(load_unet(teacher_dir), scheduler_config(teacher_dir), grid_for(teacher_dir, n, m),
                   method_config(**options), teacher=uncond)


def _randomised(trainer: Trainer, seed: int = 1) -> Trainer:
    """A student clearly different from its teacher (LoRA B off zero)."""
    state = trainer.trainable_state_dict()
    g = torch.Generator().manual_seed(seed)
    trainer.load_trainable_state_dict({k: 0.05 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v
                                       for k, v in state.items()})
    return trainer


def test_the_peers_grid_and_phases_are_the_published_ones(tiny_sd15_dir):
    grid = SkippingGrid.make(VpDdim(scheduler_config(tiny_sd15_dir)), 50)
    assert (grid.timesteps[0], grid.timesteps[1], grid.timesteps[-1]) == (19, 39, 999)
    assert grid.previous[:3] == (0, 19, 39) and len(grid) == 50
    pcm = _trainer(tiny_sd15_dir, method="pcm").method
    assert pcm.edges == [0, 12, 25, 37]  # floor(linspace(0, 50, 4, endpoint=False))
    assert [pcm.phase_end(i) for i in (0, 11, 12, 24, 25, 37, 49)] == [0, 0, 239, 239, 499, 739, 739]


def test_lcm_scalings_equal_diffusers_lcm_scheduler(tiny_sd15_dir):
    lcm = _trainer(tiny_sd15_dir, method="lcm").method
    stock = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 1, 19, 499, 999):
        c_skip, c_out = stock.get_scalings_for_boundary_condition_discrete(t)
        assert lcm.boundary(t) == pytest.approx((float(c_skip), float(c_out)), rel=1e-6)
    assert lcm.boundary(0) == (1.0, 0.0)  # f(x, 0) = x: the consistency boundary condition


def test_the_exported_lcm_scheduler_steps_the_grid_and_scalings_the_student_learned(tiny_sd15_dir, tmp_path):
    """diffusers' LCMScheduler read from the export, at a solver grid and a timestep scaling other
    than its defaults: it visits only the K-step grid the student was distilled along and applies the
    student's own c_skip/c_out there (a scheduler left at its defaults samples another model)."""
    trainer = _trainer(tiny_sd15_dir, method="lcm", solver_steps=20, timestep_scaling=4.0)
    lcm = trainer.method
    export = trainer.export(tmp_path / "export", teacher=str(tiny_sd15_dir), model_card={})
    stock = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    stock.set_timesteps(trainer.grid.num_slots)
    visited = [int(t) for t in stock.timesteps]
    assert visited == [999, 749, 499, 249]  # LCM's script: every (K/N)-th point of its K-step grid, from the top
    assert set(visited) <= set(lcm.solver.timesteps)
    for t in visited:
        c_skip, c_out = stock.get_scalings_for_boundary_condition_discrete(t)
        assert lcm.boundary(t) == pytest.approx((float(c_skip), float(c_out)), rel=1e-6)


@pytest.mark.parametrize("method", ["pcm", "lcm"])
def test_the_online_teacher_step_is_the_bare_teacher_guided(tiny_sd15_dir, method):
    """One guided DDIM step t₊ → t by the UNet with its LoRA bypassed, from x0 noised to t₊."""
    trainer = _randomised(_trainer(tiny_sd15_dir, method=method, teacher_guidance=(2.0, 2.0)))
    cond = random_cond(trainer.unet, seed=2)
    x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    example = Example(torch.zeros(9, *LATENT[1:]), cond, 0, x0)
    draw = trainer.method.draw(example, torch.Generator().manual_seed(5))
    assert draw.t == (draw.t_plus - 20 if draw.t_plus > 19 else 0) and draw.guidance == 2.0

    teacher = load_unet(tiny_sd15_dir)
    ac = inference_scheduler(scheduler_config(tiny_sd15_dir)).alphas_cumprod
    uncond = trainer.method.uncond
    with torch.no_grad():
        out = guided_prediction(teacher, draw.x_plus, draw.t_plus, cond, 2.0, uncond)
    torch.testing.assert_close(draw.x_teacher, ddim_step(draw.x_plus, out, draw.t_plus, draw.t, ac), rtol=0, atol=1e-5)
    a = ac[draw.t_plus]
    # x₊ is x0 noised by the generator's first normal draw after the index
    g = torch.Generator().manual_seed(5)
    torch.randint(50, (1,), generator=g)
    noise = torch.randn(LATENT, generator=g)
    torch.testing.assert_close(draw.x_plus, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=0, atol=1e-6)


def test_pcm_target_at_a_phase_edge_is_the_teacher_step_alone(tiny_sd15_dir):
    trainer = _randomised(_trainer(tiny_sd15_dir, method="pcm"))
    seed = next(s for s in range(200) if int(torch.randint(50, (1,), generator=torch.Generator().manual_seed(s))) == 12)
    example = Example(torch.zeros(9, *LATENT[1:]), random_cond(trainer.unet), 0, torch.randn(LATENT))
    calls = []
    trainer.unet.register_forward_pre_hook(lambda m, a, k: calls.append((int(a[1]), torch.is_grad_enabled())),
                                           with_kwargs=True)
    terms = next(trainer.method.losses(example, torch.Generator().manual_seed(seed)))
    # teacher (CFG, one batched call) at t₊ = 259, student at t₊ with grad; no target call: t = 239 = s
    assert calls == [(259, False), (259, True)] and set(terms.generator) == {"pcm_pointwise"}


def test_method_options_reach_the_cli_and_name_the_run():
    args = build_parser().parse_args(["distill", "--trajectories", "S", "--out", "R", "--method", "pcm",
                                      "--pcm-adversarial", "--x0-source", "renders", "--teacher-guidance", "5", "6",
                                      "--disc-schedule", "alternate", "--disc-betas", "0", "0.999"])
    config = model_from_args(DistillRunConfig, args)
    assert config.method == "pcm" and config.pcm.pcm_adversarial and config.peer.x0_source == "renders"
    assert config.peer.teacher_guidance == (5.0, 6.0) and config.adversarial.disc_betas == (0.0, 0.999)
    rapm = DistillRunConfig(trajectories="S", out="R")
    # Sections a method does not read leave its run's name alone; its own do not.
    assert run_config_hash(rapm.model_copy(update={"peer": config.peer, "pcm": config.pcm})) == run_config_hash(rapm)
    lcm = rapm.model_copy(update={"method": "lcm"})
    assert run_config_hash(lcm) != run_config_hash(rapm)
    assert run_config_hash(lcm.model_copy(update={"rapm": rapm.rapm.model_copy(update={"lambda_rel": 2.0})})) == \
        run_config_hash(lcm)
    assert run_config_hash(lcm.model_copy(update={"peer": config.peer})) != run_config_hash(lcm)
    with pytest.raises(ValueError, match="increasing"):
        MethodConfig.from_options(teacher_guidance=(6.0, 5.0))


def test_x0_is_the_stores_own_sample_or_a_real_render(tmp_path, make_store):
    store_path = make_store(tmp_path, EMBEDDED_TEACHER, num=2, prompts=all_prompts()[:2])
    store = TrajectoryStore(str(store_path))
    from_store = load_example(store, 1)
    assert torch.equal(from_store.x0, from_store.positions[-1:])
    renders = render_latents(store, [0, 1], torch.device("cpu"))
    again = render_latents(store, [0, 1], torch.device("cpu"))
    assert renders[1].shape == from_store.x0.shape and torch.equal(renders[1], again[1])  # seeded per trajectory
    assert not torch.allclose(renders[0], renders[1])
    assert torch.equal(load_example(store, 1, renders).x0, renders[1])


def test_renders_need_a_domain_that_renders(tmp_path, tiny_sd15_dir, make_store):
    store = make_store(tmp_path, tiny_sd15_dir, num=1)  # "a red circle" is no shapes caption
    config = run_config(store, tmp_path / "run", iterations=1, method={"method": "lcm", "x0_source": "renders"})
    with pytest.raises(ConfigError, match="needs a renderer"):
        run_distillation(config, log=lambda _: None)


@pytest.mark.parametrize("method", ["pcm", "lcm"])
def test_the_stock_pipeline_with_a_peers_export_reproduces_its_sampler(method, tiny_sd15_dir, tmp_path):
    trainer = _randomised(_trainer(tiny_sd15_dir, method=method))
    export = trainer.export(tmp_path / "export", teacher=str(tiny_sd15_dir), model_card={"iterations": 1})
    scheduler_cls = {"pcm": DDIMScheduler, "lcm": LCMScheduler}[method]
    saved = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == scheduler_cls.__name__
    info = json.loads((export / "inference.json").read_text())
    assert (info["method"], info["scheduler"], info["num_inference_steps"]) == (method, scheduler_cls.__name__, 4)
    assert f"from diffusers import StableDiffusionPipeline, {scheduler_cls.__name__}" in (export / "README.md").read_text()

    cond = random_cond(trainer.unet, seed=3)
    latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(4))
    ours = trainer.sample(latents, cond, generator=[torch.Generator().manual_seed(11)])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_cls.from_pretrained(export, subfolder="scheduler")
    pipe.load_lora_weights(export)
    stock = pipe(prompt_embeds=cond.prompt_embeds, num_inference_steps=4, guidance_scale=1.0, latents=latents.clone(),
                 output_type="latent", generator=[torch.Generator().manual_seed(11)]).images
    assert (stock - ours).abs().max() <= 1e-4
    if method == "lcm":  # its sampler draws noise between steps: the generator matters
        other = trainer.sample(latents, cond, generator=[torch.Generator().manual_seed(12)])
        assert (other - ours).abs().max() > 1e-3


def test_an_lcm_run_is_evaluated_with_its_own_scheduler(tmp_path, tiny_sd15_dir, make_store):
    from rapm_core.evaluate.config import EvaluateConfig
    from rapm_core.evaluate.run import evaluate_run
    from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

    store = make_store(tmp_path, tiny_sd15_dir, num=2)
    config = run_config(store, tmp_path / "run", iterations=2, method={"method": "lcm"})
    run_distillation(config, log=lambda _: None)
    eval_prompts = tmp_path / "eval-prompts"
    write_prompt_store(eval_prompts, [PromptRecord(prompt_id(t), t, "eval") for t in ("a red circle", "a blue cat")])
    result = evaluate_run(EvaluateConfig(run=config.out, prompts=str(eval_prompts), num_images=2, batch_size=2,
                                         device="cpu", evaluator="none", samplers=["student"], trajectory_rows=1),
                          log=lambda _: None)
    student = next(r for r in result.rows if r["sampler"] == "student")
    assert student["label"] == "LCM student 2 steps" and student["nfe"] == 2 and student["latent_mse"] > 0


def test_evaluation_samples_an_lcm_student_as_the_stock_pipeline_does(tiny_sd15_dir, tmp_path):
    """Evaluation's student row, read from the export the way evaluation reads it, against a stock
    StableDiffusionPipeline with the exported LCMScheduler and LoRA, from the same latents and
    step noise: the scheduler evaluation measures is the one that ships."""
    from rapm_core.evaluate.samplers import eval_seed, sample_latents, sampler_specs
    from rapm_core.evaluate.student import load_student_export

    trainer = _randomised(_trainer(tiny_sd15_dir, method="lcm"))
    export = trainer.export(tmp_path / "export", teacher=str(tiny_sd15_dir), model_card={})
    student = load_student_export(export)
    evaluated = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    student.load_into(evaluated)
    spec = sampler_specs(evaluated.scheduler.config, 4, 2, 3.0, student)["student"]
    cond = random_cond(trainer.unet, seed=3)
    latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(4))
    seed = eval_seed(0, 0, "rapm-eval-steps")
    ours = sample_latents(spec, evaluated.unet, evaluated.scheduler.config, latents, cond, None, [seed])

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.load_lora_weights(export)
    stock = pipe(prompt_embeds=cond.prompt_embeds, num_inference_steps=4, guidance_scale=1.0, latents=latents.clone(),
                 output_type="latent", generator=[torch.Generator().manual_seed(seed)]).images
    assert (stock - ours).abs().max() <= 1e-4
