"""Ctrl-C and kill -9 of a real ``rapm distill``: signals are sent the way a terminal sends them
(to the command's process group), and what is left is read back from the run dir and the process
table. Without a Prefect server the command runs its flow in its own process and starts no other,
so nothing can outlive it."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from rapm_testing.helpers import alive, children, rapm_env, run_rapm, session_processes, start_rapm, wait_until
from storage.checkpoints import CheckpointStore


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir, make_store):
    return make_store(tmp_path_factory.mktemp("interrupt-store"), tiny_sd15_dir)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect")


def _distill_args(store, out, iterations: int) -> list[str]:
    return ["distill", "--trajectories", str(store), "--out", str(out), "--iterations", str(iterations),
            "--checkpoint-every", "2", "--keep-checkpoints", "2", "--disc-channels", "8", "--device", "cpu",
            "--seed", "1"]


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:  # a process that outlived its command (the bug under test), by its PID only
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_stops_in_seconds_keeps_the_checkpoint_and_the_same_command_resumes(tmp_path, store, prefect_home):
    env = rapm_env(prefect_home)
    out = tmp_path / "run"
    args = _distill_args(store, out, iterations=40)
    proc = start_rapm(args, env, tmp_path / "interrupted")
    ckpts = CheckpointStore(out)
    started: list[int] = []
    try:
        wait_until(lambda: bool(ckpts.steps()), 180, proc, "the first checkpoint")
        started = children(proc.pid)
        said_before = (tmp_path / "interrupted" / "stderr").read_text()
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        code = proc.wait(timeout=60)
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftovers(started)
    err = (tmp_path / "interrupted" / "stderr").read_text()
    said_after = err[len(said_before):].strip().splitlines()
    assert code == 130, err
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"
    assert "Traceback" not in err
    # Lines a flow logged between reading stderr and the signal are progress lines, not errors.
    last = [line for line in said_after if "iteration" not in line or line.startswith("rapm distill:")]
    assert len(last) == 1 and last[0].startswith("rapm distill: interrupted; kept checkpoint step-"), said_after
    kept = ckpts.steps()[-1]
    assert ckpts.verify(kept[1]) is None and f"{kept[1].name} (iteration {kept[0]})" in last[0]
    assert "run the same command to resume" in last[0]
    assert started == []  # no Prefect server, no other process: the flow ran in the command itself
    assert session_processes(proc.pid) == []

    code, out_text, err = run_rapm(args, env, tmp_path / "resumed")
    assert code == 0, err
    assert f"resuming {out} from checkpoint" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 41))
    assert (out / "done.json").is_file()


@pytest.mark.slow
def test_kill_9_leaves_no_process_behind(tmp_path, store, prefect_home):
    env = rapm_env(prefect_home)
    out = tmp_path / "run"
    proc = start_rapm(_distill_args(store, out, iterations=100000), env, tmp_path / "killed")
    left: list[int] = []
    try:
        wait_until(lambda: bool(CheckpointStore(out).steps()), 180, proc, "the first checkpoint")
        assert children(proc.pid) == [], "the command started a process (a Prefect server?)"
        proc.kill()  # kill -9 PID (or the OOM killer): the command alone, not its process group
        proc.wait()
        left = session_processes(proc.pid)
        assert not left, f"{left} outlived the killed command"
        assert not (prefect_home / "prefect.db").exists()  # no Prefect server ever ran for it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftovers(left)
