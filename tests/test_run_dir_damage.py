"""A damaged run dir, as a user damages it (rm, truncate, echo): the derived parts (the export,
done.json, metrics.jsonl) are rebuilt or continued from the checkpoints, what cannot be rebuilt
(run.json) is one line naming it, and nothing valid is thrown away."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from rapm_core.distill.config import DistillRunConfig
from rapm_core.distill.run import run_distillation
from rapm_testing.helpers import rapm_env, run_rapm, start_rapm, wait_until, without_dac_override
from storage.checkpoints import CheckpointStore
from storage.run_dir import RunDir

LORA = "pytorch_lora_weights.safetensors"
ITERATIONS = 3  # the tiny_run fixture's
# The options the tiny_run fixture trained with, as a user types them again.
OPTIONS = ["--disc-channels", "8", "--lr", "0.01", "--lr-disc", "0.01", "--loss-relative", "both",
           "--loss-absolute", "both", "--checkpoint-every", str(ITERATIONS), "--device", "cpu"]


@pytest.fixture
def run_copy(tmp_path, tiny_run):
    """A copy of the finished run to damage; the store and prompt store are shared, read-only."""
    _prompts, store, run = tiny_run
    return store, Path(shutil.copytree(run, tmp_path / "run"))


def _distill_args(store: Path, run: Path) -> list[str]:
    return ["distill", "--trajectories", str(store), "--out", str(run), "--iterations", str(ITERATIONS), *OPTIONS]


def _evaluate_args(run: Path) -> list[str]:
    return ["evaluate", "--run", str(run), "--num-images", "2", "--device", "cpu"]


def _distill(store: Path, run: Path, tmp_path: Path) -> tuple[int, str, str]:
    """In its own process: a rebuilt export must not depend on the process (its hash seed)."""
    return run_rapm(_distill_args(store, run), rapm_env(tmp_path / "prefect"), tmp_path / "logs-distill")


def _one_line(command: str, err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rapm {command}: error: "), err
    return lines[0]


DAMAGE = {
    "export-deleted": lambda run: (run / "export" / LORA).unlink(),
    "export-truncated": lambda run: (run / "export" / LORA).open("r+b").truncate(100),
    "done-json-corrupt": lambda run: (run / "done.json").write_text("{\n"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_distill_rebuilds_a_damaged_export_or_done_json_from_the_last_checkpoint(tmp_path, tiny_run, run_copy,
                                                                                  damage):
    store, run = run_copy
    original = (tiny_run[2] / "export" / LORA).read_bytes()
    DAMAGE[damage](run)
    assert RunDir(run).export_problem() is not None or damage == "done-json-corrupt"
    code, out, err = _distill(store, run, tmp_path)
    assert code == 0, out + err
    assert "nothing to do" not in out + err
    assert "rebuilding the export" in out + err
    # The rebuilt export is the same student, byte for byte (in another process: another hash seed).
    assert (run / "export" / LORA).read_bytes() == original
    assert RunDir(run).export_problem() is None
    assert RunDir(run).done()["step"] == ITERATIONS
    assert [s for s, _ in CheckpointStore(run).steps()] == [ITERATIONS]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == ITERATIONS  # no iteration trained again


@pytest.mark.parametrize("damage", ["export-deleted", "export-truncated"])
def test_evaluate_on_a_damaged_export_says_to_rebuild_it_in_one_line(run_copy, damage, rapm_in_process):
    _store, run = run_copy
    DAMAGE[damage](run)
    code, _, err = rapm_in_process(_evaluate_args(run))
    assert code == 2, err
    line = _one_line("evaluate", err)
    assert line.startswith(f"rapm evaluate: error: {run / 'export'}: {LORA} ")
    assert line.endswith("run `rapm distill` with the run's options to rebuild the export from the last checkpoint")


def test_a_truncated_run_json_is_one_line_in_distill_and_evaluate(run_copy, rapm_in_process):
    store, run = run_copy
    (run / "run.json").open("r+b").truncate(40)
    kept = sorted(p.relative_to(run) for p in run.rglob("*"))
    for command, args in {"distill": _distill_args(store, run), "evaluate": _evaluate_args(run)}.items():
        code, _, err = rapm_in_process(args)
        assert code == 2, err
        line = _one_line(command, err)
        assert line.startswith(f"rapm {command}: error: {run / 'run.json'}: damaged (not valid JSON")
        assert "restore it, or train into another --out" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == kept  # nothing touched


def test_evaluate_on_a_corrupt_done_json_says_to_rebuild_it_in_one_line(run_copy, rapm_in_process):
    _store, run = run_copy
    DAMAGE["done-json-corrupt"](run)
    code, _, err = rapm_in_process(_evaluate_args(run))
    assert code == 2, err
    assert _one_line("evaluate", err).startswith(f"rapm evaluate: error: {run / 'done.json'}: damaged (not valid JSON")


def test_a_deleted_metrics_log_keeps_the_checkpoints_and_the_log_goes_on(tmp_path, run_copy):
    """Extending a run whose metrics.jsonl is gone resumes from its checkpoint (the old code said
    "delete the run dir"); the log holds the new iterations and the loss of the lost ones is said."""
    store, run = run_copy
    (run / "metrics.jsonl").unlink()
    said: list[str] = []
    config = DistillRunConfig.model_validate({**json.loads((run / "run.json").read_text())["config"],
                                              "trajectories": str(store), "out": str(run), "device": "cpu",
                                              "iterations": ITERATIONS + 2, "checkpoint_every": ITERATIONS})
    result = run_distillation(config, log=said.append)
    assert result.trained == 2 and result.step == ITERATIONS + 2
    assert any("resuming" in line and f"step-{ITERATIONS:07d}" in line for line in said), said
    assert any("metrics.jsonl holds 0 of the 3 lines" in line for line in said), said
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [ITERATIONS + 1, ITERATIONS + 2]


@pytest.mark.slow
def test_a_second_evaluate_of_the_same_run_is_refused_at_once(tmp_path, run_copy):
    _store, run = run_copy
    env = rapm_env(tmp_path / "prefect")
    args = ["evaluate", "--run", str(run), "--num-images", "100000", "--device", "cpu"]
    first = start_rapm(args, env, tmp_path / "first")
    try:
        wait_until(lambda: getattr(RunDir(run).lock().holder(), "pid", None) == first.pid, 180, first,
                   "the first evaluate to hold the run dir")
        code, _, err = run_rapm(args, env, tmp_path / "second", timeout=120)
        assert code == 2, err
        assert _one_line("evaluate", err).startswith(
            f"rapm evaluate: error: {run}: run dir is in use by another rapm process (pid {first.pid}")
        assert first.poll() is None  # the first one carries on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_evaluate_on_a_read_only_run_dir_fails_before_sampling(tmp_path, run_copy):
    _store, run = run_copy
    run.chmod(0o555)
    try:
        code, out, err = run_rapm(_evaluate_args(run), rapm_env(tmp_path / "prefect"), tmp_path / "logs-evaluate",
                                  preexec_fn=without_dac_override)  # its own process, without root's override
        if code == 0:
            pytest.skip("cannot make a directory unwritable for a child process here")
    finally:
        run.chmod(0o755)
    assert code == 2, out + err
    # One line before any flow started (the old code sampled every image, then failed to write).
    assert _one_line("evaluate", err) == (f"rapm evaluate: error: {run}: permission denied; "
                                          f"choose another path or make it writable")
    assert "evaluating" not in out + err
    assert not (run / "eval").exists()
