"""What a ``rapm`` command imports before it does its work, in a fresh process as typed: ``--help``
(top level and every subcommand's) imports neither torch, the diffusion libraries nor Prefect;
``rapm store inspect`` and ``rapm ingest`` do without torch. How long that takes is measured in
``benchmarks/bench_cli.py`` (RESULTS.md, "CLI start-up"), not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import COMMANDS
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

ROOT = Path(__file__).resolve().parent.parent
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft")

# Runs `rapm ARGS` in this process, then writes which of the watched modules it had imported.
_PROBE = """
import json, sys
from flows.cli import main
watched, report, argv = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
try:
    code = main(argv)
except SystemExit as exit:
    code = exit.code
with open(report, "w") as f:
    json.dump({"code": code, "imported": [m for m in watched if m in sys.modules]}, f)
"""


def _imports(args: list[str], tmp_path: Path, watched=(*MODEL_LIBRARIES, "prefect")) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    report = tmp_path / "imports.json"
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(watched), str(report), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    result = json.loads(report.read_text())
    assert result["code"] in (0, None), proc.stdout + proc.stderr
    return result["imported"]


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in COMMANDS]], ids=" ".join)
def test_help_imports_no_model_library_and_no_prefect(args, tmp_path):
    assert _imports(args, tmp_path) == []


def test_store_inspect_does_without_torch(tmp_path, tiny_sd15_dir):
    from rapm_core.trajectories.config import TrajectoriesConfig
    from rapm_core.trajectories.generate import generate_trajectories

    write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id("a red circle"), "a red circle")])
    store = tmp_path / "store"
    generate_trajectories(TrajectoriesConfig(prompts=str(tmp_path / "prompts"), teacher=str(tiny_sd15_dir),
                                             out=str(store), slots=2, steps_per_slot=1, device="cpu"),
                          log=lambda _m: None)
    assert _imports(["store", "inspect", str(store)], tmp_path) == []


def test_ingest_does_without_torch(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"a shape number {i}\n" for i in range(8)), encoding="utf-8")
    assert _imports(["ingest", str(source), "--out", str(tmp_path / "store")], tmp_path,
                    watched=MODEL_LIBRARIES) == []
    assert (tmp_path / "store").is_dir()
