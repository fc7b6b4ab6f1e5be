"""Stage 0's engine: read and check a prompt file, split it, write the prompt store.

A store is only ever created whole, from a source that read cleanly. Re-ingesting with the same
config and the same source bytes finds the finished store and does nothing, so the stage can be
re-run safely.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.sources import check_source, collect_prompts, detect_format, read_source
from rapm_core.ingest.split import assign_splits
from storage.errors import ConfigMismatchError, SourceError, StoreError
from storage.hashing import config_hash, file_sha256
from storage.prompt_store import PromptRecord, PromptStore, prompt_id, write_prompt_store


@dataclass(frozen=True)
class IngestCounts:
    read: int
    blank: int
    duplicates: int
    kept: int
    train: int
    eval: int


@dataclass(frozen=True)
class IngestPlan:
    """What an ingest would do: records to write, or ``already_complete`` with the store's counts."""

    config: IngestConfig
    source_sha256: str
    format: str
    counts: IngestCounts
    already_complete: bool
    records: list[PromptRecord] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """One line: the store, its counts, the source (the CLI's answer and the flow's log line)."""
        c = self.counts
        head = "already complete: " if self.already_complete else ""
        return (f"{head}{self.config.out}: {c.kept} prompts ({c.train} train, {c.eval} eval at --eval-fraction "
                f"{self.config.eval_fraction:g}) from {self.config.source} "
                f"[{self.format}]; read {c.read}, blank {c.blank}, duplicates {c.duplicates}")


def ingest_config_hash(config: IngestConfig) -> str:
    # Where the store lives is not what it is made of: ``out`` stays out of the hash.
    return config_hash(_identity(config))


def _identity(config: IngestConfig) -> dict:
    return config.model_dump(mode="json", exclude={"out"})


def _existing_counts(config: IngestConfig, source_sha256: str) -> IngestCounts | None:
    """The counts of the store at ``config.out`` if it is this very ingest, finished; None if
    there is no store yet; an error if something else is there."""
    out = Path(config.out)
    if not out.exists():
        return None
    if not (out / "meta.json").is_file():
        raise StoreError(f"{out}: already exists and is not a prompt store; choose another --out or delete it")
    meta = PromptStore(out).meta
    if meta.get("config_hash") != ingest_config_hash(config):
        old = meta.get("config", {})
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in _identity(config).items() if old.get(k) != v]
        raise ConfigMismatchError(f"{out}: made by a different ingest ({'; '.join(diffs) or 'unknown config'}); "
                                  f"choose another --out or delete it")
    if meta.get("source", {}).get("sha256") != source_sha256:
        raise ConfigMismatchError(f"{out}: made from different contents of {config.source} (the file changed since); "
                                  f"choose another --out or delete it")
    return IngestCounts(**meta["counts"])


def plan_ingest(config: IngestConfig) -> IngestPlan:
    """Read and check everything, write nothing; every user error surfaces here."""
    source = Path(config.source)
    check_source(source)
    fmt = detect_format(source, config.format)
    sha = file_sha256(source)
    existing = _existing_counts(config, sha)
    if existing is not None:
        return IngestPlan(config, sha, fmt, existing, already_complete=True)
    if source.stat().st_size == 0:
        raise SourceError(source, "empty file; nothing to ingest")
    texts, counts = collect_prompts(read_source(source, fmt, config.column), config.limit)
    if not texts:
        raise SourceError(source, f"no prompts: all {counts['read']} entries are blank" if counts["read"]
                          else "no prompts in the file")
    ids = [prompt_id(text) for text in texts]
    splits = assign_splits(ids, config.seed, config.eval_fraction)
    records = [PromptRecord(pid, text, split) for pid, text, split in zip(ids, texts, splits)]
    n_eval = sum(r.split == "eval" for r in records)
    final = IngestCounts(**counts, kept=len(records), train=len(records) - n_eval, eval=n_eval)
    return IngestPlan(config, sha, fmt, final, already_complete=False, records=records)


def ingest_prompts(config: IngestConfig) -> IngestPlan:
    """Create the prompt store ``config.out`` from ``config.source``, or find it already made."""
    plan = plan_ingest(config)
    if plan.already_complete:
        return plan
    meta = {
        "config": _identity(config),
        "config_hash": ingest_config_hash(config),
        "source": {"path": config.source, "format": plan.format, "sha256": plan.source_sha256},
        "counts": asdict(plan.counts),
    }
    write_prompt_store(config.out, plan.records, meta)
    return plan
