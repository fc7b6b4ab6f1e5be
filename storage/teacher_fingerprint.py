"""A content fingerprint of a local teacher directory.

A trajectory store names its teacher by path, and a path can be retrained or overwritten; a
store resumed, or a student distilled, against other weights at the same path would mix two
teachers without a word. The fingerprint (sha256 over the files of the pipeline's components)
is recorded when a store is created and checked before a stage loads the teacher again. Hub ids
are named by id and revision, which the store already records, and get no fingerprint.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from storage.errors import ConfigMismatchError
from storage.hashing import config_hash, file_sha256
from storage.trajectory_schema import StoreSchema


def teacher_fingerprint(source: str | Path) -> str | None:
    """sha256 over the sha256 of ``model_index.json`` and of every file of the components it lists
    (keyed by relative path, so a copied directory fingerprints the same); None if ``source``
    is not a local diffusers directory. Cached per process on (path, size, mtime) of the files,
    so a stage that asks twice reads the weights once."""
    root = Path(source).expanduser()
    index = root / "model_index.json"
    if not index.is_file():
        return None
    components = sorted(k for k in json.loads(index.read_text(encoding="utf-8")) if not k.startswith("_"))
    files = [index] + sorted(f for c in components if (root / c).is_dir() for f in (root / c).rglob("*") if f.is_file())
    signature = tuple((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
    return _content_hash(str(root.resolve()), signature)


@functools.lru_cache(maxsize=8)
def _content_hash(root: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    return config_hash({rel: file_sha256(Path(root) / rel) for rel, _size, _mtime in signature})


def check_teacher_unchanged(schema: StoreSchema, store: str) -> None:
    """Refuse to go on when the teacher a store's schema records now has other files.

    Stores made before fingerprints were recorded, and hub teachers, pass unchecked."""
    recorded = schema.teacher_fingerprint
    current = teacher_fingerprint(schema.teacher) if recorded else None
    if current is not None and current != recorded:
        raise ConfigMismatchError(
            f"{store}: the teacher at {schema.teacher} is not the one that made this store (its files' "
            f"sha256 changed since); restore those weights, or make a new store with `rapm trajectories --out NEW`")
