"""User errors of real ``rapm`` commands are one line on stderr and exit 2 (issue 13, item 9: a
teacher name that is neither a directory nor reachable)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from hardening_support import ROOT, rapm_env, run_rapm
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store


@pytest.fixture
def prompt_store(tmp_path):
    return write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id(t), t) for t in ("a red circle", "a cat")])


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
    probe = subprocess.run([sys.executable, "-c", timed], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
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
