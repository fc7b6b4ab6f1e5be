import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from flows.cli import main as rapm_main
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.eval_dir import finished
from rapm_core.evaluate.run import evaluate_run
from rapm_core.evaluate.samplers import sampler_specs
from rapm_core.evaluate.student import StudentExport
from rapm_core.ode import StockSampler, ode_for
from rapm_core.sampler import sample_stock
from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher
from rapm_core.trajectories.chain import initial_noise
from rapm_shapes.evaluator import ShapesClassifier, save_evaluator
from rapm_testing.helpers import EVAL_PROMPTS, perturb_unet_weights
from storage.errors import ConfigMismatchError, StoreError


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_dpm_solver_equals_stock_pipeline(kind, tiny_sd15_dir, tiny_sdxl_dir):
    teacher = load_teacher(tiny_sd15_dir if kind == "sd15" else tiny_sdxl_dir)
    prompts = EVAL_PROMPTS[:2]
    noise = initial_noise([1, 2], teacher.latent_shape, torch.float32, "cpu")
    sampler = ode_for(teacher.scheduler_config).dpm_solver(4)
    ours = sample_stock(teacher.unet, sampler, noise, encode_prompts(teacher, prompts), 3.0, encode_uncond(teacher))

    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    stock = cls(**{**teacher.pipe.components, "scheduler": sampler.scheduler()})
    stock.set_progress_bar_config(disable=True)
    ref = stock(prompts, latents=noise.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="latent").images
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert stock.scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_sampler_specs_cost(tiny_sd15_dir):
    student = StudentExport(Path("export"), StockSampler({"_class_name": "DDIMScheduler"}, 4), method="rapm")
    specs = sampler_specs(load_teacher(tiny_sd15_dir).scheduler_config, num_slots=4, steps_per_slot=10, guidance=7.5,
                          student=student)
    assert {k: s.nfe for k, s in specs.items()} == {"teacher_ref": 80, "teacher_ddim": 8, "dpm_solver": 8,
                                                    "student": 4}
    assert specs["student"].guidance == 1.0


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    torch.manual_seed(0)
    return save_evaluator(ShapesClassifier(width=4, feature_dim=8), tmp_path_factory.mktemp("evaluator"))


def test_evaluate_writes_every_output(tiny_run, tiny_evaluator):
    prompts, store, run = tiny_run
    config = EvaluateConfig(run=str(run), trajectories=str(store), num_images=6, batch_size=4, device="cpu",
                            evaluator=str(tiny_evaluator), grid_rows=3, trajectory_rows=2)
    progress = []
    result = evaluate_run(config, progress=progress.append, log=lambda _: None)
    assert not result.skipped
    eval_dir = run / "eval"
    assert Path(result.eval_dir) == eval_dir
    for name in ("metrics.json", "grid.png", "metrics.png", "trajectory.png", "report.md"):
        assert (eval_dir / name).stat().st_size > 0, name
    assert progress[-1].percent == pytest.approx(100.0) and progress[-1].unit == "images"

    data = json.loads((eval_dir / "metrics.json").read_text())
    rows = {r["sampler"]: r for r in data["samplers"]}
    assert list(rows) == ["teacher_ref", "teacher_ddim", "dpm_solver", "student"]
    assert {k: r["nfe"] for k, r in rows.items()} == {"teacher_ref": 8, "teacher_ddim": 4, "dpm_solver": 4,
                                                      "student": 2}
    assert rows["teacher_ref"]["latent_mse"] is None and rows["teacher_ref"]["psnr"] is None
    for name in ("teacher_ddim", "dpm_solver", "student"):
        assert rows[name]["latent_mse"] > 0 and np.isfinite(rows[name]["psnr"])
    for r in rows.values():
        assert np.isfinite(r["domain_fid"]) and r["domain_fid"] >= 0
        assert 0.0 <= r["prompt_adherence"] <= 1.0
        assert r["images_per_second"] > 0
    # FID to the teacher: the same evaluator features, the N·M-step reference samples as the reference set (this
    # random tiny evaluator's features hardly vary, so its distances are tiny; test_eval_scale.py has real ones)
    assert rows["teacher_ref"]["domain_fid_to_teacher"] == pytest.approx(0.0, abs=1e-12)
    for name in ("teacher_ddim", "dpm_solver", "student"):
        assert rows[name]["domain_fid_to_teacher"] > 0
    assert rows["student"]["distill_seconds"] > 0
    eval_prompts = {json.loads(line)["text"] for line in (prompts / "prompts.jsonl").read_text().splitlines()
                    if json.loads(line)["split"] == "eval"}
    assert set(data["prompts"]) == eval_prompts  # the eval split, repeated to 6 images

    # Grid: rows = prompts, columns = methods; trajectory figure: 2 rows per trajectory, N+1 columns.
    assert Image.open(eval_dir / "grid.png").size[0] > Image.open(eval_dir / "grid.png").size[1] / 2
    report = (eval_dir / "report.md").read_text()
    for link in ("grid.png", "metrics.png", "trajectory.png"):
        assert f"({link})" in report
    assert "| RAPM student 2 steps |" in report and "domain FID to teacher" in report

    # The same config on the same finished run is already done, whatever the batch size.
    again = evaluate_run(config.model_copy(update={"batch_size": 2}), log=lambda _: None)
    assert again.skipped and again.rows == data["samplers"]
    assert finished(config.model_copy(update={"seed": 1})) is None


def test_evaluate_is_reproducible_across_batch_sizes(tiny_run, tmp_path):
    """Per-image seeds: the samples don't depend on how images are batched (teacher_ddim vs itself)."""
    _, store, run = tiny_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    base = dict(run=str(copy), trajectories=str(store), num_images=4, device="cpu", evaluator="none",
                samplers=["teacher_ddim"])
    a = evaluate_run(EvaluateConfig(batch_size=4, **base), log=lambda _: None).rows
    shutil.rmtree(copy / "eval")
    b = evaluate_run(EvaluateConfig(batch_size=1, **base), log=lambda _: None).rows
    assert [r["sampler"] for r in a] == ["teacher_ref", "teacher_ddim"]
    assert a[1]["latent_mse"] == pytest.approx(b[1]["latent_mse"], rel=1e-4)
    assert "domain_fid" not in a[1]


def test_evaluate_refuses_other_weights_at_the_teacher_path(tmp_path, tiny_sd15_dir, tiny_evaluator, build_tiny_run):
    teacher = Path(shutil.copytree(tiny_sd15_dir, tmp_path / "teacher"))
    _, store, run = build_tiny_run(tmp_path, teacher, iterations=1)
    perturb_unet_weights(teacher)
    config = EvaluateConfig(run=str(run), trajectories=str(store), num_images=2, batch_size=2, device="cpu",
                            evaluator=str(tiny_evaluator))
    with pytest.raises(ConfigMismatchError, match="is not the one that made this store"):
        evaluate_run(config, log=lambda _: None)
    assert not (run / "eval" / "metrics.json").exists()


def test_evaluate_finds_the_store_its_run_was_distilled_from(tiny_run, tmp_path, capsys):
    """`rapm evaluate --run RUN` as the README types it: no --trajectories, no --prompts."""
    _, _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    assert rapm_main(["evaluate", "--run", str(copy), "--num-images", "2", "--batch-size", "2", "--device", "cpu",
                      "--evaluator", "none", "--samplers", "student"]) == 0
    assert "| RAPM student 2 steps |" in capsys.readouterr().out
    assert (copy / "eval" / "metrics.json").is_file()


def test_evaluate_refuses_unfinished_run(tmp_path):
    with pytest.raises(StoreError, match="not a run dir"):
        evaluate_run(EvaluateConfig(run=str(tmp_path)), log=lambda _: None)
