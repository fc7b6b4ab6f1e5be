"""``manifest.json``: the size and sha256 of every file of a directory that is written whole
(a checkpoint, the export), written last inside its temp dir. A directory whose files no longer
match it (a deleted, truncated or changed file) is damaged and is not used as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from storage.hashing import file_sha256

MANIFEST = "manifest.json"


def write_manifest(directory: str | Path, info: dict[str, Any]) -> None:
    """List every file under ``directory`` (relative POSIX paths) in its ``manifest.json``, with ``info``."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({**info, "files": files}, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of ``directory``; raises ValueError (or OSError) when it is missing or malformed."""
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("no file list")
    return manifest


def manifest_problem(directory: str | Path, required: Iterable[str] = ()) -> str | None:
    """Why ``directory`` does not match its manifest (or lacks one), or None if every file checks out."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return f"no {MANIFEST} (written by an earlier rapm, or deleted)"
    try:
        listed = read_manifest(directory)["files"]
    except (OSError, ValueError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    missing = [name for name in required if name not in listed]
    if missing:
        return f"{MANIFEST} does not list {', '.join(missing)}"
    for name, want in listed.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            size, wanted = f.stat().st_size, int(want["bytes"])
            if size != wanted:
                return f"{name} has {size} bytes, {MANIFEST} says {wanted}"
            if file_sha256(f) != want["sha256"]:
                return f"{name} does not match its sha256 in {MANIFEST}"
        except (KeyError, TypeError, ValueError) as err:
            return f"unreadable {MANIFEST} entry for {name} ({err})"
    return None
