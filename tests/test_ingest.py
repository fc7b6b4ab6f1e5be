"""`rapm ingest` end to end: user errors are one line on stderr with exit 2 and no store, a
finished store is reported as such, and one real run in a subprocess runs the flow without any
Prefect server (the same command on a server is in test_prefect_e2e)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.engine import ingest_prompts
from storage.prompt_store import PromptStore

BAD_SOURCES = [
    # file name, contents, extra options, line in the message, what the message must say
    ("latin1.txt", b"fine\ncaf\xe9\n", [], 2, "not valid UTF-8"),
    ("p.csv", b"id,description\n1,a cat\n", [], 1, "'id', 'description'"),
    ("p.csv", b"id,prompt\n1,a cat\n", ["--column", "title"], 1, "no column 'title'"),
    ("p.jsonl", b'{"prompt": "a"}\n{"caption": "b"}\n', [], 2, "no field 'prompt'; fields here: 'caption'"),
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b",}\n', [], 2, "invalid JSON"),
    ("captions.json", b'{"annotations": [\n{"caption": "a"}\n{"caption": "b"}]}', [], 3, "invalid JSON"),
    ("empty.txt", b"", [], None, "empty file"),
    ("blank.txt", b"\n \r\n\t\n", [], None, "all 3 entries are blank"),
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["ingest", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name,data,options,line,problem", BAD_SOURCES, ids=[f"{c[0]}-{c[4]}" for c in BAD_SOURCES])
def test_bad_source_is_one_line_exit_2_and_no_store(tmp_path, capsys, name, data, options, line, problem):
    src = tmp_path / name
    src.write_bytes(data)
    code, _out, err = run_cli(capsys, str(src), "--out", str(tmp_path / "store"), *options)
    where = f"{src}:{line}" if line is not None else f"{src}"
    assert code == 2
    assert err.startswith(f"rapm ingest: error: {where}: ") and problem in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_source_file(tmp_path, capsys):
    code, _out, err = run_cli(capsys, str(tmp_path / "nope.txt"), "--out", str(tmp_path / "store"))
    assert (code, err) == (2, f"rapm ingest: error: {tmp_path / 'nope.txt'}: no such file\n")


def test_invalid_option_is_one_line(tmp_path, capsys):
    code, _out, err = run_cli(capsys, str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"), "--eval-fraction", "1.5")
    assert code == 2 and err.startswith("rapm ingest: error: invalid options: --eval-fraction") and err.count("\n") == 1


def test_existing_store_same_config_is_already_complete(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("a cat\na dog\na cat\n", encoding="utf-8")
    config = IngestConfig(source=str(src), out=str(tmp_path / "store"), seed=7)
    ingest_prompts(config)
    before = (tmp_path / "store" / "prompts.jsonl").read_bytes()
    code, out, _err = run_cli(capsys, str(src), "--out", str(tmp_path / "store"), "--seed", "7")
    assert code == 0
    assert out.startswith("already complete: ") and "2 prompts" in out and "duplicates 1" in out
    assert (tmp_path / "store" / "prompts.jsonl").read_bytes() == before


def test_existing_store_other_config_or_not_a_store_is_refused(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("a cat\n", encoding="utf-8")
    ingest_prompts(IngestConfig(source=str(src), out=str(tmp_path / "store")))
    code, _out, err = run_cli(capsys, str(src), "--out", str(tmp_path / "store"), "--seed", "1")
    assert code == 2 and "made by a different ingest (seed: 0 -> 1)" in err and err.count("\n") == 1
    (tmp_path / "other").mkdir()
    code, _out, err = run_cli(capsys, str(src), "--out", str(tmp_path / "other"))
    assert code == 2 and "already exists and is not a prompt store" in err


def test_rapm_ingest_without_a_server_runs_the_flow_in_its_own_process(tmp_path):
    src = tmp_path / "captions.jsonl"
    rows = [{"caption": f"a photo of object {i % 30}"} for i in range(40)] + [{"caption": "  "}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"))
    rapm = Path(sys.executable).with_name("rapm")
    proc = subprocess.run([str(rapm), "ingest", str(src), "--out", str(tmp_path / "store"), "--eval-fraction", "0.2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = PromptStore(tmp_path / "store")
    counts = store.meta["counts"]
    assert (counts["read"], counts["blank"], counts["duplicates"], counts["kept"], len(store)) == (41, 1, 10, 30, 30)
    assert len(store.records("eval")) == 6  # round(0.2 × 30)
    assert proc.stdout.startswith(f"{tmp_path / 'store'}: 30 prompts (24 train, 6 eval at --eval-fraction 0.2) ")
    assert "| INFO    | " in proc.stderr and "30 prompts" in proc.stderr  # the flow's log line, on stderr
    # No temporary Prefect server: none started, so none wrote a database.
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()
    assert "Beginning flow run" not in proc.stderr
