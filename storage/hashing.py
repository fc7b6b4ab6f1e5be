"""Content hashes that name what a store or run was made from.

A config hash is taken over canonical JSON (sorted keys, no whitespace), so the same settings
hash the same whatever order a dict was built in or which process built it; a stage compares
hashes to decide whether an existing store is its own finished work or someone else's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(data: dict) -> str:
    """sha256 (hex) of ``data`` as canonical JSON; pass ``model.model_dump(mode="json")``."""
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: str | Path) -> str:
    """sha256 over the sha256 of every file under ``root``, keyed by relative path (a copied
    directory hashes the same; any changed, added or removed file changes it)."""
    root = Path(root).expanduser()
    return config_hash({p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()})
