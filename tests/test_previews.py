"""Previews while a run trains: a grid of the student's samples at every checkpoint beside the
teacher's reference, the prompts encoded once, and training itself untouched by them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from rapm_core.distill.previews import CACHE, LATEST, PREVIEW_DIR, preview_name
from rapm_core.distill.run import TIMING_FIELDS, run_distillation
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.run import evaluate_run
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_testing.helpers import run_config
from storage.eval_store import EvalStore
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

TRAIN = ["a red circle", "two blue squares", "a green triangle on grey"]
EVAL = ["a yellow star", "a small blue circle", "three red squares"]


def make_store(root: Path, teacher_dir: Path, eval_prompts: list[str]) -> Path:
    prompts = root / "prompts"
    write_prompt_store(prompts, [PromptRecord(prompt_id(t), t) for t in TRAIN]
                       + [PromptRecord(prompt_id(t), t, "eval") for t in eval_prompts])
    out = root / "trajectories.zarr"
    generate_trajectories(TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(out), slots=2,
                                             steps_per_slot=2, guidance=3.0, device="cpu", batch_size=3,
                                             store_dtype="float32"), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir):
    return make_store(tmp_path_factory.mktemp("previews"), tiny_sd15_dir, EVAL)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def cell(grid: np.ndarray, row: int, column: int, size: int = 128, gap: int = 2, scale: int = 4) -> np.ndarray:
    """One image of a preview grid, at its own size."""
    top, left = row * (size + gap), column * (size + gap)
    return grid[top:top + size:scale, left:left + size:scale]


def trained(run: Path) -> tuple[list[dict], dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(run / "export" / "pytorch_lora_weights.safetensors")


def test_previews_at_every_checkpoint_leave_training_bit_identical(tmp_path, store):
    # With previews, stopped at a checkpoint and resumed without the prompt store (the encoded
    # prompts are in the run dir) …
    run = tmp_path / "with"
    logged = []
    run_distillation(run_config(store, run, iterations=2, checkpoint_every=1, preview_prompts=2), log=logged.append)
    previews = run / PREVIEW_DIR
    assert sorted(p.name for p in previews.glob("*.png")) == [LATEST, preview_name(1), preview_name(2)]
    assert (previews / LATEST).read_bytes() == (previews / preview_name(2)).read_bytes()
    assert any("previews: 2 eval prompts encoded" in m for m in logged)
    prompt_store = Path(json.loads((run / "run.json").read_text())["trajectory_store"]).parent / "prompts"
    shutil.move(prompt_store, tmp_path / "moved")
    try:
        logged.clear()
        run_distillation(run_config(store, run, iterations=4, checkpoint_every=1, preview_prompts=2),
                         log=logged.append)
    finally:
        shutil.move(tmp_path / "moved", prompt_store)
    assert not any("encoded" in m for m in logged) and (previews / preview_name(4)).is_file()
    assert json.loads((previews / "prompts.json").read_text()) == EVAL[:2]
    # A row per prompt, the teacher's reference then the student, 32-pixel images drawn 4× large.
    latest, first = pixels(previews / LATEST), pixels(previews / preview_name(1))
    assert latest.shape == (2 * 128 + 2, 2 * 128 + 2, 3)
    assert not np.array_equal(cell(first, 0, 1), cell(latest, 0, 1))  # the student learns
    np.testing.assert_array_equal(cell(first, 1, 0), cell(latest, 1, 0))  # the reference stays

    # … trains exactly what a run without previews trains.
    plain = tmp_path / "without"
    run_distillation(run_config(store, plain, iterations=4, checkpoint_every=1, preview_prompts=0), log=lambda _: None)
    assert not (plain / PREVIEW_DIR).exists()
    rows, lora = trained(run)
    plain_rows, plain_lora = trained(plain)
    assert rows == plain_rows
    assert lora.keys() == plain_lora.keys() and all((lora[k] == plain_lora[k]).all() for k in lora)

    # The reference column is evaluation's teacher reference of the same eval prompts, and the
    # student column its student images (fused there, an adapter here: equal to rounding).
    config = EvaluateConfig(run=str(run), num_images=2, grid_rows=2, batch_size=2, samplers=["student"], seed=0,
                            device="cpu", evaluator="none", feature_store=str(tmp_path / "features.zarr"))
    evaluate_run(config, log=lambda _: None)
    evaluated = EvalStore(config.feature_store)
    for i in range(2):
        np.testing.assert_array_equal(cell(latest, i, 0), evaluated.grid("teacher_ref")[i])
        assert np.abs(cell(latest, i, 1).astype(int) - evaluated.grid("student")[i].astype(int)).max() <= 1
    reference = load_file(previews / CACHE)["reference"].clone()  # a copy: the file is truncated below
    assert reference.shape == (2, 32, 32, 3)

    # The encoded prompts are derived data: a damaged file is made again, not a failure.
    with open(previews / CACHE, "r+b") as f:
        f.truncate(100)
    logged.clear()
    run_distillation(run_config(store, run, iterations=5, checkpoint_every=1, preview_prompts=2), log=logged.append)
    assert any("previews: 2 eval prompts encoded" in m for m in logged) and (previews / preview_name(5)).is_file()
    assert (load_file(previews / CACHE)["reference"] == reference).all()


def test_no_eval_split_trains_without_previews(tmp_path, tiny_sd15_dir):
    store = make_store(tmp_path, tiny_sd15_dir, [])
    logged = []
    run_distillation(run_config(store, tmp_path / "run", iterations=1), log=logged.append)
    assert (tmp_path / "run" / "export").is_dir() and not (tmp_path / "run" / PREVIEW_DIR).exists()
    assert any("previews: no eval split" in m for m in logged)


def test_preview_option_is_not_part_of_the_run():
    from flows.cli import build_parser
    from flows.cli_model import model_from_args
    from rapm_core.distill.config import DistillRunConfig
    from rapm_core.distill.run import run_config_hash

    def config(*extra: str) -> DistillRunConfig:
        args = build_parser().parse_args(["distill", "--trajectories", "S", "--out", "R", *extra])
        return model_from_args(DistillRunConfig, args)

    off, default = config("--preview-prompts", "0"), config()
    assert (off.preview_prompts, default.preview_prompts) == (0, 4)
    assert run_config_hash(off) == run_config_hash(default)  # a run can turn them on or off when resumed


@pytest.mark.slow
def test_a_run_killed_around_its_previews_resumes_bit_identically(tmp_path, store):
    from test_exact_resume import _kill_when, _metrics, _start

    reference = run_config(store, tmp_path / "reference", iterations=6, checkpoint_every=2, preview_prompts=0)
    run_distillation(reference, log=lambda _: None)
    run = tmp_path / "killed"
    config = reference.model_copy(update={"out": str(run), "preview_prompts": 2})
    previews = run / PREVIEW_DIR
    kill_points = [lambda: (previews / CACHE).exists(),  # encoded, training not yet checkpointed
                   lambda: (previews / preview_name(2)).exists()]  # right after the first preview
    killed = []
    for n, ready in enumerate(kill_points):
        killed.append(_kill_when(_start(config, tmp_path / f"child-{n}.log"), ready))
    assert killed[0], "the first child finished before it could be killed"
    final = _start(config, tmp_path / "final.log")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()
    want, got = (load_file(r / "export" / "pytorch_lora_weights.safetensors") for r in (tmp_path / "reference", run))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want), f"killed: {killed}"
    assert _metrics(run) == _metrics(tmp_path / "reference")
    assert (previews / LATEST).read_bytes() == (previews / preview_name(6)).read_bytes()
    assert not list(previews.glob(".*.tmp"))
