"""Stage 0's options: how a prompt file is read and split, and where the store goes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rapm_core.config import FrozenModel

SourceFormat = Literal["auto", "txt", "csv", "jsonl", "coco"]


class IngestOptions(FrozenModel):
    """How a prompt file is read and split (what a pipeline sets for its ingest stage)."""

    format: SourceFormat = Field("auto", description="source format; auto picks it from the file extension")
    column: str | None = Field(None, description="CSV column, JSONL field or COCO annotation field holding the prompt; "
                                                 "unset: the first of prompt, caption, text (caption for COCO)")
    limit: int | None = Field(None, ge=1, description="keep the first N unique prompts, in source order, and read no further")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                 description="share of prompts held out for evaluation: round(fraction × prompts) of them "
                                             "(at least one of two or more), the lowest by a hash of id and seed")


class IngestConfig(IngestOptions):
    """What `rapm ingest` does; also the Prefect form and, minus ``out``, the store's identity."""

    source: str = Field(description="prompt file: .txt (one prompt a line), .csv, .jsonl, or COCO captions .json",
                        json_schema_extra={"cli": "positional"})
    out: str = Field(description="prompt store directory to create")
    seed: int = Field(0, description="seed of the train/eval split")

