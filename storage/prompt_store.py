"""The prompt store: a directory holding ``prompts.jsonl`` (one record a line: id, text, split)
and ``meta.json`` (counts, source, config hash). Written whole into a temp directory and
renamed, so a store either exists complete or not at all.

Ids are content hashes of the normalised text: stable across runs, machines and re-ingests,
so trajectory stores can refer to prompts by id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal

from storage.atomic import atomic_directory
from storage.errors import StoreError

PROMPT_STORE_SCHEMA = 1
Split = Literal["train", "eval"]


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PromptRecord:
    id: str
    text: str
    split: Split = "train"


def write_prompt_store(path: str | Path, records: Iterable[PromptRecord], meta: dict | None = None) -> Path:
    """Create a prompt store at ``path`` (which must not exist) atomically."""
    path = Path(path)
    records = list(records)
    if not records:
        raise StoreError(f"{path}: refusing to write an empty prompt store")
    if path.exists():
        raise StoreError(f"{path}: already exists; choose another --out or delete it")
    full_meta = {
        "schema": PROMPT_STORE_SCHEMA,
        "count": len(records),
        "splits": {s: sum(r.split == s for r in records) for s in ("train", "eval")},
        **(meta or {}),
    }
    with atomic_directory(path) as tmp:
        with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


class PromptStore:
    """Read-only view of a prompt store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file, data_file = self.path / "meta.json", self.path / "prompts.jsonl"
        if not meta_file.is_file() or not data_file.is_file():
            raise StoreError(f"{self.path}: not a prompt store (expected meta.json and prompts.jsonl); run `rapm ingest` first")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("schema") != PROMPT_STORE_SCHEMA:
            raise StoreError(f"{self.path}: prompt store schema {self.meta.get('schema')} is not {PROMPT_STORE_SCHEMA}")
        with open(data_file, encoding="utf-8") as f:
            self._records = [PromptRecord(**json.loads(line)) for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self._records)

    def records(self, split: Split | None = None) -> list[PromptRecord]:
        return [r for r in self._records if split is None or r.split == split]
