"""One JSON object per line in a recipe's ``training_log.jsonl``: losses, timings, metrics, so the
committed assets carry the evidence of how they were made."""

from __future__ import annotations

import json
import time
from pathlib import Path


class Logbook:
    def __init__(self, path: str | Path, echo: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.start = time.perf_counter()

    def write(self, **record) -> None:
        record = {"elapsed_s": round(time.perf_counter() - self.start, 2), **record}
        line = json.dumps(record)
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.echo:
            print(line, flush=True)
