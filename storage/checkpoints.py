"""The checkpoint store: ``RUN_DIR/checkpoints/step-XXXXXXX/``, one directory per checkpoint.

A checkpoint holds everything a resumed run needs to continue *exactly* as if never stopped
(the peers' resumes drop discriminator heads or break on fp16; ours must be bit-identical):
the trainable tensors, both optimizers' state, every RNG state, the data cursor, the number of
metrics lines written so far, and the config with its hash.

Tensors go to safetensors; the nested structures around them (optimizer param groups, RNG
tuples) go to JSON with a small tagged encoding, so nothing here unpickles code. Each
directory is written through :func:`storage.atomic.atomic_directory` (temp dir, fsync,
rename) and carries ``manifest.json`` (size and sha256 of every file, written last): a kill
mid-write leaves only a ``.tmp-*`` directory, and a checkpoint damaged later on disk fails
verification and is skipped for the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from storage.atomic import atomic_directory, remove_stale_temps
from storage.errors import StoreError
from storage.manifest import manifest_problem, write_manifest

CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TREES = ("optimizer", "rng")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint failed verification and was skipped in favour of an older one."""


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: Any  # nested dicts/lists holding tensors (both optimizers)
    rng: Any  # nested RNG states: python, numpy, torch CPU/CUDA, the training generator
    cursor: dict[str, int]  # where the loop is: data epoch/position and its counters
    metrics_lines: int  # lines of metrics.jsonl that belong to steps <= ``step``
    config: dict
    config_hash: str
    path: Path | None = field(default=None, compare=False)


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ---- nested state <-> (JSON, tensors) ---------------------------------------------------

def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of ``obj``; its tensors are moved into ``tensors`` under their path.

    Tuples, non-string dict keys (optimizer state is keyed by int) and numpy arrays are
    tagged so :func:`decode_tree` returns the same types; anything else is refused rather
    than silently stringified.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        items = [(encode_tree(k, tensors, f"{path}/key{i}"), encode_tree(v, tensors, f"{path}/{k}"))
                 for i, (k, v) in enumerate(obj.items())]
        return {"__dict__": [list(kv) for kv in items]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__dict__"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


# ---- files ------------------------------------------------------------------------------

def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _expected_files() -> list[str]:
    return ["trainable.safetensors", "state.json"] + [f"{t}.{ext}" for t in _TREES for ext in ("json", "safetensors")]


class CheckpointStore:
    """Checkpoints of one run, newest last; keeps the last ``keep``. One writer per run dir."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def steps(self) -> list[tuple[int, Path]]:
        """All checkpoint directories present (valid or not), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def save(self, ckpt: Checkpoint) -> Path:
        """Write ``ckpt`` atomically, then drop all but the newest ``keep`` checkpoints.

        Leftover ``.tmp-*`` directories are earlier writes that were killed: with one writer
        per run dir they are stale by the time a new save starts, so they are cleared here.
        A directory already at this step is a checkpoint from an abandoned future (the run
        resumed from an older one, usually because this one failed verification); it is
        moved aside before the new one takes its place.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clear_stale()
        final = self.dir / step_dir_name(ckpt.step)
        if final.exists():
            aside = self.dir / f".tmp-replaced-{final.name}-{os.getpid()}"
            os.rename(final, aside)
            shutil.rmtree(aside)
        with atomic_directory(final) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in ckpt.trainable.items()},
                      tmp / "trainable.safetensors")
            for name in _TREES:
                tensors: dict[str, torch.Tensor] = {}
                encoded = encode_tree(getattr(ckpt, name), tensors)
                save_file(tensors, tmp / f"{name}.safetensors")
                _write_json(tmp / f"{name}.json", encoded)
            _write_json(tmp / "state.json", {
                "format": CHECKPOINT_FORMAT, "step": ckpt.step, "cursor": ckpt.cursor,
                "metrics_lines": ckpt.metrics_lines, "config": ckpt.config, "config_hash": ckpt.config_hash,
            })
            write_manifest(tmp, {"format": CHECKPOINT_FORMAT, "step": ckpt.step})
        self._prune()
        return final

    def clear_stale(self) -> list[Path]:
        return remove_stale_temps(self.dir)

    def verify(self, path: Path) -> str | None:
        """Why the checkpoint at ``path`` cannot be trusted, or None if every file checks out."""
        return manifest_problem(path, required=_expected_files())

    def latest_valid(self) -> Path | None:
        """Newest checkpoint that verifies; each newer one that does not is skipped with a warning."""
        for step, path in reversed(self.steps()):
            problem = self.verify(path)
            if problem is None:
                return path
            warnings.warn(f"skipping checkpoint {path}: {problem}", CorruptCheckpointWarning, stacklevel=2)
        return None

    def load(self, path: Path | None = None) -> Checkpoint | None:
        """Load ``path`` (verified first), or the newest valid checkpoint; None if there is none.

        When checkpoints exist but none verifies, a warning says that the run starts over (the
        caller logs the warnings of this call; each rejected checkpoint has one of its own).
        """
        if path is None:
            path = self.latest_valid()
            if path is None:
                if rejected := len(self.steps()):
                    warnings.warn(f"no valid checkpoint in {self.dir} ({rejected} rejected), "
                                  "starting from iteration 0", CorruptCheckpointWarning, stacklevel=2)
                return None
        elif (problem := self.verify(path)) is not None:
            raise StoreError(f"checkpoint {path}: {problem}")
        state = _read_json(path / "state.json")
        trees = {name: decode_tree(_read_json(path / f"{name}.json"), load_file(path / f"{name}.safetensors"))
                 for name in _TREES}
        return Checkpoint(
            step=state["step"], trainable=load_file(path / "trainable.safetensors"), cursor=state["cursor"],
            metrics_lines=state["metrics_lines"], config=state["config"], config_hash=state["config_hash"],
            path=path, **trees,
        )

    def _prune(self) -> None:
        for _step, path in self.steps()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
