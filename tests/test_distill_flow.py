import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.torch import load_file

from flows.cli import build_parser, main
from flows.cli_model import model_from_args
from rapm_core.distill.config import DistillRunConfig
from rapm_core.distill.run import DistillationDivergedError, run_config_hash, run_distillation
from rapm_testing.helpers import perturb_unet_weights, run_config
from storage.checkpoints import CheckpointStore
from storage.errors import ConfigMismatchError


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir, make_store):
    return make_store(tmp_path_factory.mktemp("distill-store"), tiny_sd15_dir)


@pytest.fixture(scope="module")
def sd3_store(tmp_path_factory, tiny_sd3_dir, make_store):
    return make_store(tmp_path_factory.mktemp("sd3-store"), tiny_sd3_dir)


@pytest.fixture(scope="module", params=["store", "sd3_store"], ids=["unet", "sd3"])
def any_store(request):
    """The UNet teacher's store, and an SD3-class transformer teacher's."""
    return request.getfixturevalue(request.param)


def _quiet(_msg: str) -> None:
    pass


def test_cli_options_are_the_run_config():
    args = build_parser().parse_args([
        "distill", "--trajectories", "S", "--out", "R", "--iterations", "7", "--checkpoint-every", "3",
        "--rank", "2", "--lr", "0.01", "--betas", "0.5", "0.9", "--loss-relative", "pointwise",
        "--gradient-checkpointing", "--seed", "5",
    ])
    config = model_from_args(DistillRunConfig, args)
    assert (config.trajectories, config.out, config.iterations, config.checkpoint_every, config.seed) == ("S", "R", 7, 3, 5)
    assert config.training.rank == 2 and config.training.lr == 0.01 and config.training.betas == (0.5, 0.9)
    assert config.rapm.loss_relative == "pointwise" and config.training.gradient_checkpointing is True
    assert config.rapm.lambda_abs == DistillRunConfig.model_fields["rapm"].default_factory().lambda_abs
    assert config.method == "rapm"
    # Extending, moving or re-checkpointing a run keeps its identity; the method does not.
    longer = config.model_copy(update={"iterations": 99, "checkpoint_every": 1, "device": "cpu", "out": "elsewhere"})
    assert run_config_hash(longer) == run_config_hash(config)
    assert run_config_hash(config.model_copy(update={"seed": 6})) != run_config_hash(config)


def test_run_is_resumable_extendable_and_owned(tmp_path, store, capsys):
    config = run_config(store, tmp_path / "run", iterations=2)
    seen = []
    first = run_distillation(config, progress=seen.append, log=_quiet)
    assert (first.step, first.trained, first.already_done) == (2, 2, False)
    assert [p.done for p in seen] == [1, 2] and all(p.total == 2 for p in seen)
    run = Path(config.out)
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "done.json").read_text())["step"] == 2

    again = run_distillation(config, log=_quiet)
    assert again.already_done and again.trained == 0

    extended = run_distillation(config.model_copy(update={"iterations": 3}), log=_quiet)
    assert (extended.step, extended.trained) == (3, 1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert [s for s, _ in CheckpointStore(run).steps()] == [2, 3]
    assert json.loads((run / "export" / "inference.json").read_text())["num_inference_steps"] == 2

    other = config.model_copy(update={"training": config.training.model_copy(update={"rank": 2})})
    with pytest.raises(ConfigMismatchError, match=r"training\.rank"):
        run_distillation(other, log=_quiet)

    # The CLI reports the same refusal in one line (exit 2) and a finished run as a no-op (exit 0).
    same = ["distill", "--trajectories", str(store), "--out", str(run), "--iterations", "3", "--seed", "3",
            "--disc-channels", "8", "--lr", "0.01", "--lr-disc", "0.01", "--loss-relative", "both",
            "--loss-absolute", "both"]
    capsys.readouterr()
    assert main(same) == 0
    assert "already trained to 3 iterations" in capsys.readouterr().out
    assert main(same + ["--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different config" in err and "training.rank" in err


def _nan_positions(store: Path, copy_to: Path, indices) -> Path:
    shutil.copytree(store, copy_to)
    positions = zarr.open_group(str(copy_to), mode="r+")["positions"]
    for i in indices:
        positions[i] = np.nan
    return copy_to


def test_nonfinite_example_is_skipped_and_a_streak_fails_loudly(tmp_path, any_store):
    store = any_store
    one_bad = _nan_positions(store, tmp_path / "one-bad.zarr", [1])
    config = run_config(one_bad, tmp_path / "run-one", iterations=3, method={"max_consecutive_nonfinite": 2})
    logged = []
    assert run_distillation(config, log=logged.append).step == 3
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "nonfinite" in r]
    assert len(rows) == 3 and len(skipped) == 1 and skipped[0]["trajectory"] == 1
    assert skipped[0]["nonfinite"]["slot"] == 1  # the first slot run (n = N−1) already sees the NaN
    assert any("trajectory 1, slot 1" in m and "skipped" in m for m in logged)

    all_bad = _nan_positions(store, tmp_path / "all-bad.zarr", range(3))
    config = run_config(all_bad, tmp_path / "run-all", iterations=4, checkpoint_every=1,
                        method={"max_consecutive_nonfinite": 2})
    with pytest.raises(DistillationDivergedError, match="2 consecutive non-finite"):
        run_distillation(config, log=_quiet)
    ckpts = CheckpointStore(config.out)
    assert [s for s, _ in ckpts.steps()] == [1]  # written before the streak hit the limit, nothing after
    good = ckpts.load()
    assert all(v.abs().sum() == 0 for k, v in good.trainable.items() if "lora_B" in k)  # no step was taken
    assert len((Path(config.out) / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (Path(config.out) / "export").exists()


@pytest.mark.slow
def test_rapm_distill_command_runs_the_flow(tmp_path, store):
    rapm = Path(sys.executable).parent / "rapm"
    run = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)  # no server: the command runs the flow's body itself
    proc = subprocess.run(
        [str(rapm), "distill", "--trajectories", str(store), "--out", str(run), "--iterations", "3",
         "--checkpoint-every", "2", "--disc-channels", "8", "--device", "cpu", "--seed", "1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{run}: 3 iterations" in proc.stdout
    lora = load_file(run / "export" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    assert (run / "export" / "scheduler" / "scheduler_config.json").is_file()
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = CheckpointStore(run)
    assert [s for s, _ in ckpts.steps()] == [2, 3] and all(ckpts.verify(p) is None for _, p in ckpts.steps())


def test_a_store_is_not_distilled_against_other_weights_at_its_teacher_path(tmp_path, tiny_sd15_dir, make_store):
    teacher = Path(shutil.copytree(tiny_sd15_dir, tmp_path / "teacher"))
    own_store = make_store(tmp_path, teacher, num=1)
    perturb_unet_weights(teacher)
    with pytest.raises(ConfigMismatchError, match="is not the one that made this store"):
        run_distillation(run_config(own_store, tmp_path / "run", iterations=1), log=_quiet)
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
