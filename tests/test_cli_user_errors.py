"""User errors of real ``rapm`` commands are one line on stderr and exit 2 (issue 13, items 7, 8
and the offline teacher of 9): an unwritable output path, a user error raised inside a flow, a
teacher name that is neither a directory nor reachable."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from rapm_testing.helpers import ROOT, rapm_env, run_rapm, without_dac_override
from storage.manifest import write_manifest
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

@pytest.fixture
def read_only_dir(tmp_path):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    probe = subprocess.run([sys.executable, "-c", f"open({str(ro / 'probe')!r}, 'w')"],
                           preexec_fn=without_dac_override, capture_output=True)
    if probe.returncode == 0:
        ro.chmod(0o755)
        pytest.skip("cannot make a directory unwritable for a child process here")
    yield ro
    ro.chmod(0o755)


@pytest.fixture
def prompt_store(tmp_path):
    return write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id(t), t) for t in ("a red circle", "a cat")])


def _one_error_line(command: str, err: str) -> str:
    """The error line, checked to be the only thing the command said about the failure."""
    assert "Traceback" not in err, err
    assert "Encountered exception" not in err and "Finished in state Failed" not in err, err
    lines = err.strip().splitlines()
    ours = [line for line in lines if line.startswith(f"rapm {command}:")]
    assert len(ours) == 1 and lines[-1] == ours[0], err
    assert not [line for line in lines if "| ERROR" in line or "| WARNING" in line or "Warning" in line], err
    return ours[0]


@pytest.mark.slow
def test_unwritable_output_inside_a_flow_is_one_line_naming_the_path(tmp_path, read_only_dir):
    source = tmp_path / "prompts.txt"
    source.write_text("a red circle\na blue square\n")
    code, _, err = run_rapm(["ingest", str(source), "--out", str(read_only_dir / "prompts")],
                            rapm_env(tmp_path / "prefect"), tmp_path / "logs", preexec_fn=without_dac_override)
    assert code == 2, err
    line = _one_error_line("ingest", err)
    # The store is written into a temp dir beside its path first: the message names the directory.
    assert line == f"rapm ingest: error: {read_only_dir}: permission denied; choose another path or make it writable"


def test_unwritable_output_before_any_flow_is_one_line_naming_the_path(tmp_path, read_only_dir, prompt_store,
                                                                       tiny_sd15_dir):
    out = read_only_dir / "traj.zarr"
    code, _, err = run_rapm(["trajectories", "--prompts", str(prompt_store), "--teacher", str(tiny_sd15_dir),
                             "--out", str(out), "--slots", "2", "--steps-per-slot", "1", "--device", "cpu"],
                            rapm_env(tmp_path / "prefect"), tmp_path / "logs", preexec_fn=without_dac_override)
    assert code == 2, err
    assert _one_error_line("trajectories", err) == (
        f"rapm trajectories: error: {out}: permission denied; choose another path or make it writable")


@pytest.mark.slow
def test_a_user_error_raised_inside_a_flow_is_one_line(tmp_path):
    # A finished-looking run whose run.json does not name its trajectory store: `evaluate` finds
    # that out inside its flow (the CLI's own pre-checks only need run.json, done.json and the export's manifest).
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"format": 1, "config": {}, "config_hash": "c", "store_config_hash": "s"}')
    (run / "done.json").write_text('{"step": 2, "config_hash": "c", "export": "export"}')
    (run / "export").mkdir()
    write_manifest(run / "export", {"step": 2})  # an (empty) export that checks out
    code, _, err = run_rapm(["evaluate", "--run", str(run), "--device", "cpu"], rapm_env(tmp_path / "prefect"),
                            tmp_path / "logs")
    assert code == 2, err
    assert _one_error_line("evaluate", err) == (
        f"rapm evaluate: error: {run}/run.json does not name its trajectory store (an older run dir); "
            f"pass --trajectories")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _hub_env(tmp_path, case: str) -> dict:
    env = rapm_env(tmp_path / "prefect", HF_HOME=str(tmp_path / "hf-cache"))
    if case == "unreachable":
        env.pop("HF_HUB_OFFLINE")
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    return env


@pytest.mark.parametrize("case", ["unreachable", "HF_HUB_OFFLINE"])
def test_a_teacher_name_that_is_no_directory_and_not_reachable_fails_at_once(tmp_path, prompt_store, case):
    env = _hub_env(tmp_path, case)
    timed = ("import time; from rapm_core.teacher import detect_kind; t0 = time.monotonic()\n"
             "try:\n    detect_kind('some-teacher')\nexcept Exception as err:\n"
             "    print(f'{time.monotonic() - t0:.2f}'); print(err)")
    probe = subprocess.run([sys.executable, "-c", timed], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    seconds, message = probe.stdout.strip().splitlines()
    assert float(seconds) < 5, f"{seconds} s to refuse a teacher that cannot be reached"
    reason = "is unreachable" if case == "unreachable" else "HF_HUB_OFFLINE is set"
    assert message.startswith("cannot load teacher 'some-teacher': not a local directory") and reason in message

    code, _, err = run_rapm(["trajectories", "--prompts", str(prompt_store), "--teacher", "some-teacher",
                             "--out", str(tmp_path / "traj.zarr")], env, tmp_path / "logs", timeout=120)
    assert code == 2 and err.strip().splitlines() == [f"rapm trajectories: error: {message}"], err


def test_a_teacher_path_that_does_not_exist_is_named_as_a_missing_directory(tmp_path, prompt_store):
    from rapm_core.errors import ConfigError
    from rapm_core.teacher import detect_kind

    for source in (str(tmp_path / "no-such-teacher"), "./teachers/sd", "a/b/c"):
        with pytest.raises(ConfigError, match=r"no such directory; pass a local diffusers directory"):
            detect_kind(source)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a file, not a diffusers directory"):
        detect_kind(str(tmp_path / "file"))
