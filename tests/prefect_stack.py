"""The ``prefect_stack`` fixture (a plugin of tests/conftest.py): a real local Prefect stack for tests, brought up and taken down by the project's own
``scripts/stack.sh`` (exactly what ``make up`` / ``make down`` run) in a temporary state dir on a
free port, plus the few things a test does to it: run the CLI against it, read it through the
API, and kill its worker the way a dying machine would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType

from prefect_home import prefect_home

from rapm_testing.helpers import ROOT

STACK = ROOT / "scripts" / "stack.sh"
PREFECT = ROOT / ".venv" / "bin" / "prefect"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The automation's window: two 30 s heartbeats plus slack, so a busy machine never crashes a live run.
ZOMBIE_AFTER_S = 60


class Stack:
    def __init__(self, state_dir: Path, port: int, extra_env: dict[str, str] | None = None):
        self.state_dir, self.port = state_dir, port
        self.zombie_after_s = ZOMBIE_AFTER_S
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.env = {**os.environ, **(extra_env or {}), "RAPM_STATE_DIR": str(state_dir),
                    "RAPM_PREFECT_PORT": str(port), "PREFECT_HOME": str(prefect_home(state_dir / "prefect")),
                    "PREFECT_API_URL": self.api_url}
        self.run_dir = state_dir / "prefect-stack"

    # -- lifecycle (scripts/stack.sh) ---------------------------------------------------------------
    def up(self) -> float:
        t0 = time.perf_counter()
        subprocess.run([str(STACK), "up"], env=self.env, check=True, timeout=600, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    def down(self) -> None:
        subprocess.run([str(STACK), "down"], env=self.env, check=False, timeout=120)

    def pid(self, name: str) -> int:
        return int((self.run_dir / f"{name}.pid").read_text())

    def log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the CLI and the API ------------------------------------------------------------------------
    def prefect(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(PREFECT), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def run_deployment(self, name: str, params: dict, watch: bool) -> tuple[UUID, subprocess.CompletedProcess]:
        proc = self.prefect("deployment", "run", name, "--params", json.dumps(params), *(["--watch"] if watch else []))
        match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
        assert match, f"no flow run created:\n{proc.stdout}\n{proc.stderr}"
        return UUID(match.group(1)), proc

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.api_url)

    def flow_run(self, run_id: UUID) -> FlowRun:
        with self.client() as client:
            return client.read_flow_run(run_id)

    def subflow_runs(self, run_id: UUID) -> list[FlowRun]:
        with self.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
        return sorted(runs, key=lambda r: r.start_time or r.created)

    def wait_for_state(self, run_id: UUID, types: set[StateType], timeout: float) -> FlowRun:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run.state_type in types:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {run_id} still {run.state_type} after {timeout:.0f} s, "
                                     f"waiting for {sorted(t.value for t in types)}\n{self.log('worker')[-3000:]}")
            time.sleep(1)

    def runs_by_id(self, ids: list[UUID]) -> list[FlowRun]:
        with self.client() as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))

    # -- failure injection ---------------------------------------------------------------------------
    def kill_worker_and_its_runs(self) -> list[int]:
        """SIGKILL the worker and every flow-run process it started, as a dying machine would.

        A flow-run process runs in its own session (a worker's death alone would leave it running
        to completion), so it is found as the worker's child and killed with its own group.
        """
        worker = self.pid("worker")
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker)], capture_output=True,
                                  text=True).stdout.split()
        os.killpg(worker, signal.SIGKILL)
        for child in map(int, children):
            try:
                os.killpg(os.getpgid(child), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [worker, *map(int, children)]


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory):
    # One intra-op thread per flow run: with two, torch on a busy 2-core machine spins ~10× slower.
    stack = Stack(tmp_path_factory.mktemp("prefect-stack"), free_port(),
                  {"RAPM_ZOMBIE_AFTER_S": str(ZOMBIE_AFTER_S), "OMP_NUM_THREADS": "1"})
    try:
        stack.timings = {"up (cold)": stack.up()}
        yield stack
    finally:
        stack.down()
