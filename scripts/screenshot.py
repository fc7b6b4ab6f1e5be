"""Screenshots of the Prefect UI for the README: a finished pipeline run's Artifacts tab and its
evaluation report artifact, taken with headless Chromium from the local stack (`make up`).

    source .state/prefect-stack/env && .venv/bin/python scripts/screenshot.py [--run FLOW_RUN_ID]

Needs /usr/bin/chromium (Debian: `apt-get install chromium`). Not part of the tests. The V2 UI
is used because it honours `?tab=` on a flow-run page; V1 resets the tab while the run loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId, FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
                  # The SPA fetches the run, then its artifacts: let its timers run before the capture.
                  "--virtual-time-budget=15000"]


def latest_pipeline_run(client) -> UUID:
    from flows.pipeline import pipeline_flow

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[pipeline_flow.name])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
        sort=FlowRunSort.END_TIME_DESC, limit=1)
    if not runs:
        sys.exit(f"no completed {pipeline_flow.name!r} flow run on {PREFECT_API_URL.value()}; run the pipeline first")
    return runs[0].id


def report_artifact(client, run_id: UUID) -> UUID | None:
    subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
    evaluate = [r.id for r in subflows if r.name.startswith("evaluate-")]
    if not evaluate:
        return None
    artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=evaluate)))
    reports = [a for a in artifacts if a.type == "markdown"]
    return reports[-1].id if reports else None


def capture(url: str, out: Path, size: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found; on Debian: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rapm-chromium-") as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                                 f"--screenshot={out}", url],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not out.is_file():
        sys.exit(f"chromium wrote no screenshot for {url}")
    print(f"{out}  ←  {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=UUID, help="pipeline flow run id (default: the latest completed one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "prefect-ui-artifacts.png")
    parser.add_argument("--report-out", type=Path, default=ROOT / "docs" / "prefect-ui-report.png")
    args = parser.parse_args()
    if not PREFECT_API_URL.value():
        sys.exit("PREFECT_API_URL is not set; `source .state/prefect-stack/env` after `make up`")
    ui = PREFECT_API_URL.value().removesuffix("/").removesuffix("/api")
    with get_client(sync_client=True) as client:
        run_id = args.run or latest_pipeline_run(client)
        report = report_artifact(client, run_id)
    capture(f"{ui}/v2/runs/flow-run/{run_id}?tab=Artifacts", args.out, "1400,1000")
    if report is not None:
        capture(f"{ui}/v2/artifacts/artifact/{report}", args.report_out, "1400,2000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
