"""One writer per run dir and per trajectory store (issue 13, item 1), between real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rapm_testing.helpers import ROOT, rapm_env, run_rapm, start_rapm, wait_until
from storage.errors import StoreError
from storage.locks import LOCK_NAME, DirLock, LockedError
from storage.run_dir import RunDir

HOLD = ("import sys, time; from storage.locks import DirLock; from storage.run_dir import RunDir; "
        "lock = RunDir(sys.argv[2]).lock() if sys.argv[1] == 'run' else DirLock.beside(sys.argv[2]); "
        "lock.acquire(); print('held', flush=True); time.sleep(600)")


def _holder(kind: str, path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held", "the holder process did not take the lock"
    return proc


def test_a_second_process_is_refused_at_once_and_a_killed_holders_lock_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = _holder("run", run.path)
    try:
        t0 = time.monotonic()
        refused = rf"run dir is in use by another rapm process \(pid {holder.pid}\b"
        with pytest.raises(LockedError, match=refused) as err:
            run.lock().acquire()
        assert time.monotonic() - t0 < 1.0  # refused, not waited for
        assert isinstance(err.value, StoreError) and len(str(err.value).splitlines()) == 1
        assert run.lock().holder().pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the killed holder's flock; its record is still in the file.
    with run.lock() as lock:
        assert lock.taken_over is not None and lock.taken_over.pid == holder.pid
        assert lock.holder().pid == os.getpid()
    with run.lock() as lock:  # a clean release leaves nothing to take over
        assert lock.taken_over is None


def test_the_lock_is_reentrant_in_one_process_and_does_not_make_a_run_dir_taken(tmp_path):
    run = RunDir(tmp_path / "run")
    record = {"config": {"a": 1}, "config_hash": "h", "store_config_hash": "s"}
    with run.lock():  # e.g. the CLI around the run loop, which locks the dir again
        with RunDir(run.path).lock():
            assert run.check(record) is None  # a dir holding only its lock file is still free
            run.claim(record)
        assert run.lock().holder().pid == os.getpid()  # the outer hold is still there
    assert (run.path / LOCK_NAME).is_file() and run.check(record)["config_hash"] == "h"


def test_a_trajectory_store_lock_lives_beside_the_store(tmp_path):
    store = tmp_path / "traj.zarr"
    holder = _holder("store", store)
    try:
        with pytest.raises(LockedError, match=rf"pid {holder.pid}\b"):
            DirLock.beside(store, "trajectory store").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert not store.exists()  # nothing inside the Zarr group (Zarr warns about foreign files)
    with DirLock.beside(store, "trajectory store") as lock:
        assert lock.taken_over.pid == holder.pid


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir, make_store):
    return make_store(tmp_path_factory.mktemp("lock-store"), tiny_sd15_dir)


@pytest.mark.slow
def test_a_second_rapm_distill_on_the_same_out_is_refused_naming_the_first(tmp_path, store):
    env = rapm_env(tmp_path / "prefect")
    out = tmp_path / "run"
    args = ["distill", "--trajectories", str(store), "--out", str(out), "--iterations", "100000",
            "--checkpoint-every", "1000", "--disc-channels", "8", "--device", "cpu"]
    first = start_rapm(args, env, tmp_path / "first")
    try:
        # The first one holds the run dir (without a lock: its flow has claimed it) before the second starts.
        wait_until(lambda: getattr(RunDir(out).lock().holder(), "pid", None) == first.pid
                   or (out / "run.json").is_file(), 180, first, "the first command to hold the run dir")
        code, _, err = run_rapm(args, env, tmp_path / "second", timeout=90)
        assert code == 2, err
        assert err.strip().splitlines() == [err.strip()], err
        assert err.startswith(f"rapm distill: error: {out}: run dir is in use by another rapm process (pid {first.pid}")
        assert "Traceback" not in err
        assert first.poll() is None  # the first one carries on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
