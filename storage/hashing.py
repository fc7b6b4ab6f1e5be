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
