"""What rapm writes gets the modes the user's umask gives (a shared store stays readable by the
group), not the 0600/0700 of the temp files and directories it writes through."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

from storage.atomic import atomic_directory, write_json_atomic
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store
from storage.run_dir import RunDir


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path):
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)):
        with umask(mask):
            write_json_atomic(tmp_path / f"{mask:o}.json", {"a": 1})
            with atomic_directory(tmp_path / f"dir-{mask:o}") as tmp:
                (tmp / "x").write_text("x")
            run = RunDir(tmp_path / f"run-{mask:o}")
            run.path.mkdir()
            with run.replacing("export") as tmp:
                (tmp / "y").write_text("y")
        assert _mode(tmp_path / f"{mask:o}.json") == file_mode
        assert _mode(tmp_path / f"dir-{mask:o}") == dir_mode
        assert _mode(run.export_dir) == dir_mode


def test_a_prompt_store_and_a_run_dir_are_readable_by_others_under_umask_022(tmp_path):
    with umask(0o022):
        store = write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id("a cat"), "a cat")])
        run = RunDir(tmp_path / "run")
        run.claim({"config": {}, "config_hash": "h", "store_config_hash": "s"})
    assert _mode(store) == 0o755 and all(_mode(p) == 0o644 for p in store.iterdir())
    assert _mode(run.run_json) == 0o644
