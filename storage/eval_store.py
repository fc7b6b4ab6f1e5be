"""The evaluation's feature store: one Zarr v3 group of per-image features, written as they are made.

At the paper's scale (30K images per method) the images are not kept: each batch's features for
every metric that accumulates (Inception pool features for FID, each image's CLIP score term)
are written as one chunk, then that chunk's ``complete`` flag; a re-run skips complete chunks.
Layout (readable with plain ``zarr``; ``num`` images, ``B`` the batch size, one chunk per batch):

- ``prompt`` (num,) str: the prompt of every image index
- ``methods/<method>/<feature>`` (num, …) float32, chunks (B, …): one array per stored feature
- ``methods/<method>/grid`` (G, H, W, 3) uint8, one image per chunk: the report grid's first images
- ``methods/<method>/seconds`` (num / B,) float64: sampling and decoding time of each batch
- ``methods/<method>/complete`` (num / B,) bool: set only after that batch's data is written

Shards own batch-aligned index ranges, so concurrent writers never touch the same chunk. The
group's attributes are an :class:`EvalStoreSchema`: its identity fields (the run and its step,
the seed, the image count and batching, the prompts, the metrics' feature networks) decide what
the stored features are, and a run with another identity is refused in one line, never appended
to. A method's group records its sampler spec, so a method changed under the same name is
refused too; methods may be added to an existing store.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Literal

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict
from zarr.codecs import Crc32cCodec, ZstdCodec

from storage.errors import ConfigMismatchError, StoreError
from storage.hashing import config_hash

SCHEMA_VERSION = 1
KIND = "rapm-eval-features"
_FIELD_NAMES = {"run_config_hash": "distillation run", "run_step": "run step", "prompts_hash": "prompt set",
                "num_images": "images per method", "batch_size": "batch size (one chunk per batch)",
                "grid_images": "grid images", "metrics": "metric feature networks"}


class EvalStoreIdentity(BaseModel):
    """Every field that changes what a stored feature is."""

    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["rapm-eval-features"] = KIND
    run_config_hash: str
    run_step: int
    teacher: str
    teacher_fingerprint: str | None
    seed: int
    num_images: int
    batch_size: int
    prompts_hash: str
    grid_images: int
    metrics: dict[str, dict[str, Any]]  # metric name → its feature network (file, fingerprint)

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EvalStoreIdentity.model_fields}


class EvalStoreSchema(EvalStoreIdentity):
    """A feature store's attributes: its identity plus what the first writer learnt and provenance."""

    image_size: tuple[int, int]
    feature_shapes: dict[str, list[int]]  # stored array → shape per image
    config: dict[str, Any] | None = None
    eval_config_hash: str | None = None  # the evaluation config that created it (provenance)
    created_by: str | None = None
    config_hash: str = ""

    def finalised(self) -> "EvalStoreSchema":
        return self.model_copy(update={"config_hash": config_hash(self.identity())})

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_images / self.batch_size)


def _open(path: str, mode: str) -> zarr.Group | None:
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None


def _parse(path: str, attrs: dict) -> EvalStoreSchema:
    if attrs.get("kind") != KIND or attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: exists and is not a RAPM evaluation feature store; choose another --feature-store")
    try:
        return EvalStoreSchema.model_validate(attrs)
    except ValueError as err:
        raise StoreError(f"{path}: feature store attributes are malformed ({str(err).splitlines()[0]})") from err


def mismatch(path: str, have: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why the store at ``path`` (identity ``have``) cannot hold this run's features, or None."""
    diffs = [f"{_FIELD_NAMES.get(k, k)}: store has {have[k]!r}, this run wants {v!r}"
             if k not in ("prompts_hash", "metrics") else f"{_FIELD_NAMES[k]} differ"
             for k, v in wanted.items() if have.get(k) != v]
    if not diffs:
        return None
    return (f"{path}: existing feature store was made for another evaluation ({'; '.join(diffs)}); "
            f"use another --feature-store, or remove that one")


def check_compatible(path: str, wanted: dict[str, Any]) -> None:
    """Refuse (before any model loads) a store of another identity, or a non-empty non-store directory."""
    group = _open(path, "r")
    if group is None:
        from storage.urls import is_url, require_local

        if not is_url(path):
            local = require_local(path, "a feature store")
            if local.exists() and (not local.is_dir() or any(local.iterdir())):
                raise StoreError(f"{path}: exists and is not a RAPM evaluation feature store; "
                                 f"choose another --feature-store")
        return
    message = mismatch(path, _parse(path, dict(group.attrs)).identity(), wanted)
    if message:
        raise ConfigMismatchError(message)


def exists(path: str) -> bool:
    return _open(path, "r") is not None


class EvalStore:
    """Reader and chunk writer of an existing feature store."""

    def __init__(self, path: str, writable: bool = False):
        self.path = str(path)
        group = _open(self.path, "r+" if writable else "r")
        if group is None:
            raise StoreError(f"{self.path}: no feature store here")
        self._group = group
        self.schema = _parse(self.path, dict(group.attrs))

    @classmethod
    def create(cls, path: str, schema: EvalStoreSchema, prompts: list[str]) -> "EvalStore":
        if len(prompts) != schema.num_images:
            raise ValueError("one prompt per image")
        group = zarr.create_group(str(path), attributes=schema.finalised().model_dump(mode="json"))
        group.create_array("prompt", shape=(len(prompts),), chunks=(len(prompts),), dtype=str)[:] = \
            np.asarray(prompts, dtype=str)
        group.create_group("methods")
        return cls(path, writable=True)

    # -- methods ------------------------------------------------------------------------------
    def _method(self, name: str) -> zarr.Group | None:
        return self._group["methods"].get(name)

    def ensure_method(self, name: str, spec: dict[str, Any]) -> None:
        """Create ``name``'s arrays if missing; refuse a group made by another sampler spec."""
        existing = self._method(name)
        if existing is not None:
            if dict(existing.attrs).get("spec") != spec:
                raise ConfigMismatchError(f"{self.path}: method {name} was stored with another sampler "
                                          f"({existing.attrs.get('spec')}); use another --feature-store")
            return
        s = self.schema
        group = self._group["methods"].create_group(name, attributes={"spec": spec})
        codecs = [ZstdCodec(level=0), Crc32cCodec()]
        for feature, shape in s.feature_shapes.items():
            group.create_array(feature, shape=(s.num_images, *shape), chunks=(s.batch_size, *shape), dtype="float32",
                               compressors=codecs)
        if s.grid_images:
            group.create_array("grid", shape=(s.grid_images, *s.image_size, 3), chunks=(1, *s.image_size, 3),
                               dtype="uint8", compressors=codecs)
        for flag, dtype, fill in (("seconds", "float64", 0.0), ("complete", "bool", False)):
            group.create_array(flag, shape=(s.num_chunks,), chunks=(1,), dtype=dtype, fill_value=fill)

    def methods(self) -> list[str]:
        return sorted(self._group["methods"].group_keys())

    # -- reading ------------------------------------------------------------------------------
    def complete_mask(self, method: str) -> np.ndarray:
        group = self._method(method)
        return np.zeros(self.schema.num_chunks, bool) if group is None else np.asarray(group["complete"][:], bool)

    def pending_batches(self, method: str, start: int, stop: int) -> list[tuple[int, int]]:
        """Batches [a, b) of [start, stop) not yet complete, on the store's batch edges."""
        b, done = self.schema.batch_size, self.complete_mask(method)
        edges = range(start - start % b, stop, b)
        return [(max(e, start), min(e + b, stop)) for e in edges if not done[e // b]]

    def feature_chunks(self, method: str, feature: str, rows: int = 4096) -> Iterator[np.ndarray]:
        """A stored feature in slices of ``rows`` images, so 30K × 2048 features stream through."""
        array = self._method(method)[feature]
        for a in range(0, self.schema.num_images, rows):
            yield np.asarray(array[a:a + rows])

    def grid(self, method: str) -> np.ndarray:
        return np.asarray(self._method(method)["grid"][:])

    def seconds(self, method: str) -> float:
        return float(np.asarray(self._method(method)["seconds"][:]).sum())

    def arrays(self, method: str) -> dict[str, np.ndarray]:
        """Every array of a method (for comparisons of whole stores)."""
        group = self._method(method)
        return {name: np.asarray(group[name][:]) for name in sorted(group.array_keys())}

    # -- writing ------------------------------------------------------------------------------
    def write_batch(self, method: str, start: int, features: dict[str, np.ndarray], grid: np.ndarray | None,
                    seconds: float) -> None:
        """One batch [start, start + B): features and grid images first, the ``complete`` flag last."""
        group, s = self._method(method), self.schema
        if start % s.batch_size:
            raise ValueError(f"batch start {start} is not on a multiple of the store's batch size {s.batch_size}")
        for name, values in features.items():
            group[name][start:start + len(values)] = values
        if grid is not None and len(grid):
            group["grid"][start:start + len(grid)] = grid
        chunk = start // s.batch_size
        group["seconds"][chunk] = seconds
        group["complete"][chunk] = True
