"""Helpers of the hardening tests: real ``rapm`` commands in subprocesses (this checkout's code,
not an installed console script), and a look at their processes through /proc."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def rapm_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """A ``rapm`` command's environment without a Prefect server: it runs its flows directly."""
    Path(prefect_home).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def start_rapm(args: list[str], env: dict, logs: Path, **popen) -> subprocess.Popen:
    """``rapm ARGS`` as a terminal's foreground job: its own process group, output to files
    (a pipe would keep a test waiting on any process that inherited it)."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                            stdout=open(logs / "stdout", "w"), stderr=open(logs / "stderr", "w"),
                            start_new_session=True, **popen)


def run_rapm(args: list[str], env: dict, logs: Path, timeout: float = 300, **popen) -> tuple[int, str, str]:
    proc = start_rapm(args, env, logs, **popen)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its whole group, whatever it started there
            proc.wait()
    return code, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def wait_until(ready: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except FileNotFoundError:
        pass
    return found


def session_processes(sid: int) -> list[int]:
    """Running processes of session ``sid`` (a command started with ``start_rapm`` leads its own):
    once the command is gone, any of them is an orphan it left behind."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has stopped running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1


def without_dac_override() -> None:
    # preexec_fn: root writes into a mode-555 directory anyway; without CAP_DAC_OVERRIDE (dropped
    # from the bounding set, so gone after exec) it is refused as it is for everyone else.
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
