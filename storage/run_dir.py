"""A distillation run directory: who it belongs to, what it has logged, whether it is done.

    RUN_DIR/run.json        the hashed config, its hash and the trajectory store's hash, plus
                            whatever the first start snapshotted (e.g. the trajectory list);
                            a later start with another config is refused, never mixed in
    RUN_DIR/metrics.jsonl   one JSON line per iteration; cut back to a checkpoint's line count
                            on resume, so a resumed run's log equals an uninterrupted one's
    RUN_DIR/checkpoints/    see :mod:`storage.checkpoints`
    RUN_DIR/export/         the final artifact, swapped in whole, with a manifest.json (size and
                            sha256 of each file): derived data, rebuilt from the last checkpoint
                            when it no longer matches its manifest
    RUN_DIR/done.json       written last: the run reached this step and exported it
    RUN_DIR/.rapm-lock      held by the one process running this dir (see :mod:`storage.locks`)
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from storage.atomic import fsync_dir, fsync_tree, remove_stale_temps, temp_directory, write_json_atomic
from storage.checkpoints import CheckpointStore
from storage.errors import ConfigMismatchError, StoreError
from storage.locks import LOCK_NAME, DirLock
from storage.manifest import manifest_problem
from storage.urls import require_local

# 2: the method config tree (training/pointwise/adversarial/rapm sections) replaced the flat one.
RUN_FORMAT = 2


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


class DamagedRunFileError(StoreError):
    """A file of the run dir that rapm wrote is no longer readable (truncated, overwritten)."""


def read_run_file(path: Path, remedy: str) -> dict:
    """A JSON object rapm wrote into the run dir; a damaged one is one line naming it and ``remedy``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DamagedRunFileError(f"{path}: damaged (not UTF-8 text: {err.reason}); {remedy}") from err
    except ValueError as err:
        raise DamagedRunFileError(f"{path}: damaged (not valid JSON: {err}); {remedy}") from err
    if not isinstance(data, dict):
        raise DamagedRunFileError(f"{path}: damaged (not a JSON object); {remedy}")
    return data


class MetricsLog:
    """Append-only JSON lines, flushed per line; ``sync`` before a checkpoint records its length."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def append(self, row: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def sync(self) -> int:
        """Make every line written so far durable; return how many there are."""
        if self._file is not None:
            os.fsync(self._file.fileno())
        return self.count()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self) -> int:
        if not self.path.is_file():
            return 0
        with open(self.path, "rb") as f:
            return f.read().count(b"\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def truncate(self, lines: int) -> int:
        """Keep the first ``lines`` complete lines, dropping what a killed run wrote after them.

        Returns how many lines are kept: fewer than ``lines`` when the log was deleted or cut
        (the checkpoints stay good; the log then lacks the lost iterations' lines)."""
        self.close()
        data = self.path.read_bytes() if self.path.is_file() else b""
        end, kept = 0, 0
        while kept < lines and (nl := data.find(b"\n", end)) >= 0:
            end, kept = nl + 1, kept + 1
        with open(self.path, "ab") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        return kept


class RunDir:
    def __init__(self, path: str | Path, keep_checkpoints: int = 3):
        # Checkpoints and markers are committed by renames: a URL here would otherwise become a
        # local directory named "s3:".
        self.path = require_local(path, "a run dir")
        self.run_json = self.path / "run.json"
        self.done_json = self.path / "done.json"
        self.export_dir = self.path / "export"
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self.checkpoints = CheckpointStore(self.path, keep=keep_checkpoints)

    def lock(self) -> DirLock:
        """The run dir's one-writer lock: ``with run.lock():`` around a whole run (claim, training,
        export). A second process on the same dir gets :class:`storage.locks.LockedError` at once;
        nested holds in one process (CLI and run loop) are fine."""
        return DirLock(self.path, what="run dir")

    def check(self, record: dict[str, Any], identity: tuple[str, ...] = ("store_config_hash",)) -> dict | None:
        """The stored ``run.json`` if this dir is ``record``'s run, None if the dir is free.

        A run dir of another config, or of the same config on another trajectory store (any key
        in ``identity``), raises :class:`ConfigMismatchError` naming what differs.
        """
        if self.run_json.is_file():
            stored = self.record()
            if stored.get("format", 1) != RUN_FORMAT:
                raise ConfigMismatchError(
                    f"{self.path}: made by an earlier rapm (run format {stored.get('format', 1)}), which this "
                    f"version cannot resume or extend; evaluate it as it is, or train into another --out")
            if stored.get("config_hash") != record["config_hash"]:
                diff = _differing_keys(stored.get("config", {}), record.get("config", {})) or ["config_hash"]
                raise ConfigMismatchError(
                    f"{self.path}: run dir was made with a different config (differs in: {', '.join(diff)}); "
                    "use another --out, or the original options to resume it")
            for key in identity:
                if stored.get(key) != record.get(key):
                    raise ConfigMismatchError(
                        f"{self.path}: run dir was made with a different {key.replace('_', ' ')} "
                        f"({stored.get(key)} vs {record.get(key)}); use another --out")
            return stored
        # The lock file alone does not make a dir taken: a run that locks it first creates it so.
        if self.path.exists() and any(p.name != LOCK_NAME for p in self.path.iterdir()):
            raise StoreError(f"{self.path}: exists, is not empty and has no run.json; choose another --out")
        return None

    def claim(self, record: dict[str, Any], identity: tuple[str, ...] = ("store_config_hash",)) -> dict:
        """Make this run dir ours (``record`` becomes ``run.json``), or check that it already is.

        On resume the stored record is returned, so that what the first start snapshotted
        stays authoritative. Leftovers of killed atomic writes are cleared.
        """
        stored = self.check(record, identity)
        if stored is not None:
            remove_stale_temps(self.path)
            self.checkpoints.clear_stale()
            return stored
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_json, {"format": RUN_FORMAT, **record})
        return self.record()

    def record(self) -> dict:
        """``run.json``; a damaged one is a :class:`DamagedRunFileError` (it cannot be rebuilt: it is
        what ties the checkpoints to their config and trajectory store)."""
        return read_run_file(self.run_json, "it names the run's config and trajectory store, so the run cannot be "
                                            "resumed or evaluated; restore it, or train into another --out")

    def done(self) -> dict | None:
        """``done.json``, None before the run finished; a damaged one is a :class:`DamagedRunFileError`
        (distillation rebuilds it from the last checkpoint)."""
        if not self.done_json.is_file():
            return None
        done = read_run_file(self.done_json, "run `rapm distill` with the run's options to rebuild it "
                                             "from the last checkpoint")
        if not isinstance(done.get("step"), int):
            raise DamagedRunFileError(f"{self.done_json}: damaged (no step); run `rapm distill` with the run's "
                                      "options to rebuild it from the last checkpoint")
        return done

    def export_problem(self) -> str | None:
        """Why ``export/`` cannot be used as it is (missing, or not matching its manifest), or None."""
        if not self.export_dir.is_dir():
            return "missing"
        return manifest_problem(self.export_dir)

    def mark_done(self, info: dict) -> None:
        write_json_atomic(self.done_json, info)

    def unmark_done(self) -> None:
        """Before training past a finished step: the export is about to be replaced."""
        self.done_json.unlink(missing_ok=True)
        fsync_dir(self.path)

    @contextmanager
    def replacing(self, name: str) -> Iterator[Path]:
        """Yield a temp dir that replaces ``RUN_DIR/name`` whole once the block succeeds."""
        final = self.path / name
        tmp = temp_directory(self.path, prefix=f".tmp-{name}-")
        try:
            yield tmp
            fsync_tree(tmp)
            if final.exists():
                aside = self.path / f".tmp-old-{name}-{os.getpid()}"
                os.rename(final, aside)
                shutil.rmtree(aside)
            os.rename(tmp, final)
            fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
