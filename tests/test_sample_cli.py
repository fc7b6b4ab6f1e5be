"""``rapm sample``: a finished run's student as a user of its export gets it, seeded and reproducible,
and the very images evaluation makes of the student for the same prompt and noise."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from flows.cli import main
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.run import evaluate_run
from rapm_core.evaluate.samplers import eval_seed
from rapm_core.sample import SampleConfig, image_name, plan_sample, sample_student
from rapm_core.teacher import latent_shape
from rapm_core.trajectories.chain import initial_noise
from rapm_testing.helpers import ROOT, rapm_env
from storage.eval_store import EvalStore
from storage.prompt_store import PromptStore

def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def rapm(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=rapm_env(tmp_path / "prefect"),
                          capture_output=True, text=True, timeout=600)


def test_rapm_sample_is_evaluations_student_and_reproducible(tmp_path, tiny_run):
    prompts, store, run = tiny_run
    eval_prompts = [r.text for r in PromptStore(str(prompts)).records("eval")][:2]
    assert len(eval_prompts) == 2
    out = tmp_path / "samples"
    typed = ["sample", "--run", str(run), "--prompt", eval_prompts[0], "--prompt", eval_prompts[1],
             "--num-images", "2", "--seed", "7", "--out", str(out), "--device", "cpu", "--batch-size", "1"]
    proc = rapm(tmp_path, *typed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{out}: 4 images of 2 prompts (2 steps), contact sheet {out / 'contact_sheet.png'}" in proc.stdout
    made = json.loads((out / "sample.json").read_text())
    assert (made["steps"], made["guidance"], made["seed"]) == (2, 1.0, 7)
    assert [p["images"] for p in made["prompts"]] == [[image_name(j, 0), image_name(j, 1)] for j in range(2)]
    sheet = pixels(out / "contact_sheet.png")
    assert sheet.shape == (2 * 32 + 2, 2 * 32 + 2, 3)
    np.testing.assert_array_equal(sheet[34:, 34:], pixels(out / image_name(1, 1)))

    # Evaluation's student images at the same seed: its image i is eval prompt i % 2 from noise i,
    # so rapm sample's image i of that prompt is the same image, pixel for pixel.
    config = EvaluateConfig(run=str(run), trajectories=str(store), num_images=2, grid_rows=2, batch_size=1,
                            samplers=["student"], seed=7, device="cpu", evaluator="none",
                            feature_store=str(tmp_path / "features.zarr"))
    evaluate_run(config, log=lambda _: None)
    evaluated = EvalStore(config.feature_store).grid("student")
    for i in range(2):
        np.testing.assert_array_equal(pixels(out / image_name(i, i)), evaluated[i])

    # An image does not depend on how many were asked for or in which order: the same bytes; a
    # larger batch changes CPU kernels' rounding only.
    for batch_size in (1, 4):
        again = SampleConfig(run=str(run), prompt=eval_prompts[::-1], num_images=1, seed=7,
                             out=str(tmp_path / f"again{batch_size}"), device="cpu", batch_size=batch_size)
        sample_student(again, plan_sample(again), log=lambda _: None)
        image, before = tmp_path / f"again{batch_size}" / image_name(1, 0), out / image_name(0, 0)
        if batch_size == 1:
            assert image.read_bytes() == before.read_bytes()
        else:
            assert np.abs(pixels(image).astype(int) - pixels(before).astype(int)).max() <= 1


def test_rapm_sample_is_what_a_stock_pipeline_user_gets(tmp_path, tiny_run, tiny_sd15_dir):
    _prompts, _store, run = tiny_run
    config = SampleConfig(run=str(run), prompt=["a red circle"], num_images=2, seed=3, out=str(tmp_path / "s"),
                          device="cpu")
    result = sample_student(config, plan_sample(config), log=lambda _: None)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(run / "export")
    pipe.scheduler = DDIMScheduler.from_pretrained(run / "export", subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    steps = json.loads((run / "export" / "inference.json").read_text())["num_inference_steps"]
    noise = initial_noise([eval_seed(3, i) for i in range(2)], latent_shape(pipe.unet.config), torch.float32, "cpu")
    stock = pipe(["a red circle"] * 2, latents=noise, num_inference_steps=steps, guidance_scale=1.0,
                 output_type="np").images
    for i, path in enumerate(result.images):
        # Fused (as evaluation deploys it) vs the unfused adapter: the same to rounding.
        assert np.abs(pixels(Path(path)).astype(int) - np.round(stock[i] * 255).astype(int)).max() <= 1


def test_rapm_sample_steps_override(tmp_path, tiny_run):
    _prompts, _store, run = tiny_run
    config = SampleConfig(run=str(run), prompt=["a red circle"], num_images=1, steps=1, out=str(tmp_path / "s"),
                          device="cpu")
    result = sample_student(config, plan_sample(config), log=lambda _: None)
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["steps"] == 1
    default = SampleConfig(run=str(run), prompt=["a red circle"], num_images=1, out=str(tmp_path / "d"), device="cpu")
    other = sample_student(default, plan_sample(default), log=lambda _: None)
    assert Path(result.images[0]).read_bytes() != Path(other.images[0]).read_bytes()


@pytest.fixture(scope="module")
def no_export_run(tmp_path_factory, tiny_run):
    run = tmp_path_factory.mktemp("no-export") / "run"
    shutil.copytree(tiny_run[2], run)
    shutil.rmtree(run / "export")
    return run


@pytest.mark.parametrize("case,argv,problem", [
    ("unknown run", ["--run", "{tmp}/nope", "--prompt", "a"], "{tmp}/nope: no such run dir"),
    ("not a run", ["--run", "{tmp}", "--prompt", "a"], "{tmp}: not a run dir (no run.json)"),
    ("no export", ["--run", "{noexport}", "--prompt", "a"], "no exported student"),
    ("empty prompt", ["--run", "{run}", "--prompt", " "], "--prompt: Value error, --prompt: an empty prompt"),
    ("no prompt", ["--run", "{run}"], "no prompt: pass --prompt TEXT or --prompts FILE"),
    ("missing file", ["--run", "{run}", "--prompts", "{tmp}/p.txt"], "{tmp}/p.txt: no such prompt file"),
    ("blank file", ["--run", "{run}", "--prompts", "{blank}"], "{blank}: no prompts in it"),
    ("out is a file", ["--run", "{run}", "--prompt", "a", "--out", "{blank}"], "{blank}: a file, not a directory"),
    ("zero images", ["--run", "{run}", "--prompt", "a", "--num-images", "0"], "--num-images: Input should be"),
    ("fp16 on the cpu", ["--run", "{run}", "--prompt", "a", "--dtype", "fp16"], "--dtype fp16 on the CPU"),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_rapm_sample_refuses_in_one_line(tmp_path, capsys, tiny_run, no_export_run, case, argv, problem):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    names = {"tmp": tmp_path, "run": tiny_run[2], "noexport": no_export_run, "blank": blank}
    out = tmp_path / "out"
    argv = [a.format(**names) for a in argv]
    code = main(["sample", *argv, *([] if "--out" in argv else ["--out", str(out)]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rapm sample: error: ") and problem.format(**names) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_prompts_come_from_the_options_then_the_file(tmp_path, tiny_run):
    listed = tmp_path / "prompts.txt"
    listed.write_text("two blue squares\n\n  \na green triangle on grey\n", encoding="utf-8")
    config = SampleConfig(run=str(tiny_run[2]), prompt=["a red circle"], prompts=str(listed), out=str(tmp_path / "o"))
    assert plan_sample(config).prompts == ["a red circle", "two blue squares", "a green triangle on grey"]


def test_an_interrupted_sample_says_nothing_new_was_written(tmp_path):
    import argparse

    from flows.interrupts import where_stopped

    args = argparse.Namespace(command="sample", out=str(tmp_path / "o"))
    assert where_stopped(args) == f"interrupted; nothing new in {tmp_path / 'o'}; run the same command to sample again"
