"""The trajectory store: one Zarr v3 group holding a teacher's stored trajectories.

Layout (readable with plain ``zarr``; ``num`` trajectories, K = N·M fine steps):

- ``positions`` (num, K+1, C, H, W), store dtype, one trajectory per chunk, Blosc-compressed
- ``prompt_embeds`` (num, L, D); SDXL also ``pooled_prompt_embeds`` (num, P), ``time_ids`` (num, 6)
- ``uncond_prompt_embeds`` (1, L, D) (+ ``uncond_pooled_prompt_embeds``, ``uncond_time_ids``)
- ``prompt``, ``prompt_id`` (str), ``seed`` (int64): written whole when the store is created
- ``complete`` (num,) bool, one element per chunk, set only after that trajectory's data is written

Every per-trajectory array is chunked one trajectory per chunk, so writers in different processes
(shards) that own disjoint index ranges never touch the same file; each chunk carries a CRC32C.
Embeddings keep the teacher's compute dtype (bf16 widened to float32): they are exact and small
next to the positions. The attributes are a :class:`storage.trajectory_schema.StoreSchema`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from storage.errors import ConfigMismatchError, StoreError
from storage.trajectory_schema import SCHEMA_VERSION, STORE_DTYPES, StoreSchema, identity_mismatch
from storage.trajectory_writer import TrajectoryWriter

CONDITIONING = ("prompt_embeds", "pooled_prompt_embeds", "time_ids")
PER_TRAJECTORY = ("positions", *CONDITIONING)


class DamagedTrajectoryError(StoreError):
    """A stored trajectory's chunk fails to decode or to match its checksum."""

    def __init__(self, path: str, index: int, reason: str):
        super().__init__(f"{path}: trajectory {index} is damaged ({reason}); run `rapm store verify {path} --repair`, "
                         f"then `rapm trajectories` with the store's options regenerates it")
        self.path, self.index, self.reason = path, index, reason


@dataclass(frozen=True)
class TrajectoryRecord:
    """One stored trajectory: positions (K+1, C, H, W) in the store dtype, its conditioning arrays
    (no batch axis; pooled/time ids None outside SDXL, keyed as ``rapm_core.conditioning``'s fields)
    and its provenance."""

    index: int
    positions: np.ndarray
    conditioning: dict[str, np.ndarray | None]
    prompt: str
    prompt_id: str
    seed: int


_DAMAGED_REMEDY = "restore it from a copy, or make the store again with `rapm trajectories` into another --out"


class DamagedStoreError(StoreError):
    """The store's Zarr metadata (a ``zarr.json``) is missing or unreadable: it cannot be opened at all."""


def _orphaned_arrays(path: str) -> list[str]:
    """Arrays of a local directory whose root ``zarr.json`` is gone (a store that lost its metadata)."""
    from storage.urls import is_url  # local import: urls imports fsspec lazily

    local = Path(path)
    if is_url(path) or not local.is_dir():
        return []
    return sorted(p.name for p in local.iterdir() if (p / "zarr.json").is_file())


def _damaged_metadata(path: str, err: ValueError) -> DamagedStoreError:
    # zarr raises the bare JSONDecodeError of whichever zarr.json it was reading: find which.
    local = Path(path)
    damaged = [p for p in [local / "zarr.json", *sorted(local.glob("*/zarr.json"))] if not _is_json(p)]
    which = damaged[0].relative_to(local).as_posix() if damaged else "a zarr.json"
    return DamagedStoreError(f"{path}: damaged trajectory store: its {which} (Zarr metadata) is not valid JSON "
                             f"({str(err).splitlines()[0]}); {_DAMAGED_REMEDY}")


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except (OSError, ValueError):
        return False


def _open_group(path: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        if arrays := _orphaned_arrays(path):
            raise DamagedStoreError(
                f"{path}: damaged trajectory store: its root zarr.json (the store's identity and settings) is "
                f"missing, its arrays ({', '.join(arrays)}) are there; {_DAMAGED_REMEDY}") from err
        raise StoreError(f"{path}: no trajectory store here; run `rapm trajectories` first") from err
    except StoreError:
        raise
    except ValueError as err:
        raise _damaged_metadata(path, err) from err


def _existing_group(path: str) -> zarr.Group | None:
    try:
        return _open_group(path, "r")
    except DamagedStoreError:
        raise
    except StoreError:
        return None


def _parse_schema(path: str, attrs: dict) -> StoreSchema:
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: not a RAPM trajectory store of schema {SCHEMA_VERSION}")
    try:
        return StoreSchema.model_validate(attrs)
    except ValueError as err:
        raise StoreError(f"{path}: trajectory store attributes are malformed ({str(err).splitlines()[0]})") from err


def check_compatible(path: str, wanted: dict[str, Any]) -> "TrajectoryStore | None":
    """Fail fast (before loading a teacher) if ``path`` holds a store whose identity differs on a
    given field, or is a non-empty directory that is not a trajectory store at all. Returns the
    store found there, opened (read-only), for the caller to pass on instead of opening it again;
    None when there is none yet."""
    group = _existing_group(path)
    if group is None:
        from storage.urls import is_url, require_local  # local import: urls imports fsspec lazily

        if not is_url(path):
            local = require_local(path, "a trajectory store")
            if local.is_dir() and any(local.iterdir()):
                raise StoreError(f"{path}: exists, is not empty and is not a trajectory store; choose another --out")
        return None
    store = TrajectoryStore(path, group=group)
    message = identity_mismatch(str(path), store.schema, wanted)
    if message:
        raise ConfigMismatchError(message)
    return store


class TrajectoryStore:
    """Reader (and, with ``writable=True``, batch writer) of an existing trajectory store."""

    def __init__(self, path: str, writable: bool = False, *, group: zarr.Group | None = None,
                 schema: StoreSchema | None = None):
        """Open the store at ``path``; ``group`` (opened already) and ``schema`` (parsed already) are
        reused rather than read again."""
        self.path = str(path)
        self._group = group if group is not None else _open_group(self.path, "r+" if writable else "r")
        try:
            # Every array's metadata is read once here, so that a damaged one is named at open.
            arrays = {name: self._group[name] for name in self._group.array_keys()}
        except StoreError:
            raise
        except ValueError as err:
            raise _damaged_metadata(self.path, err) from err
        if "positions" not in arrays:
            raise StoreError(f"{self.path}: not a RAPM trajectory store of schema {SCHEMA_VERSION}")
        self.schema = schema if schema is not None else _parse_schema(self.path, dict(self._group.attrs))
        self.num: int = self.schema.num
        self.is_sdxl = "pooled_prompt_embeds" in self._group
        self._texts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def create(cls, path: str, schema: StoreSchema, prompts: list[str], prompt_ids: list[str], seeds: list[int],
               uncond: dict[str, np.ndarray | None]) -> "TrajectoryStore":
        """Create an empty store: metadata, prompts, seeds and the uncond row (arrays with a batch
        axis of 1, which also fix the embedding shapes); no trajectory is complete yet."""
        if schema.store_dtype not in STORE_DTYPES:
            raise StoreError(f"store dtype must be one of {STORE_DTYPES}, got {schema.store_dtype!r}")
        n = schema.num
        if not len(prompts) == len(prompt_ids) == len(seeds) == n:
            raise ValueError("prompts, prompt ids and seeds must all have one entry per trajectory")
        schema = schema.model_copy(update={"chunk_checksums": True}).finalised()
        group = zarr.create_group(str(path), attributes=schema.attributes())

        def per_traj(name: str, shape: tuple[int, ...], dtype: str, *codecs) -> None:
            group.create_array(name, shape=(n, *shape), chunks=(1, *shape), dtype=dtype,
                               compressors=[*codecs, Crc32cCodec()])

        per_traj("positions", (schema.positions_per_trajectory, *schema.latent_shape), schema.store_dtype,
                 BloscCodec(**schema.positions_codec))
        for name in CONDITIONING:
            row = uncond.get(name)
            if row is None:
                continue
            per_traj(name, tuple(row.shape[1:]), schema.embed_dtype, ZstdCodec(level=0))  # zarr's default
            group.create_array(f"uncond_{name}", data=row.astype(schema.embed_dtype))
        group.create_array("prompt", shape=(n,), chunks=(n,), dtype=str)[:] = np.asarray(prompts, dtype=str)
        group.create_array("prompt_id", shape=(n,), chunks=(n,), dtype=str)[:] = np.asarray(prompt_ids, dtype=str)
        group.create_array("seed", data=np.asarray(seeds, dtype=np.int64), chunks=(n,))
        group.create_array("complete", shape=(n,), chunks=(1,), dtype=bool, fill_value=False)
        return cls(path, group=group, schema=schema)

    @classmethod
    def open_or_create(cls, path: str, schema: StoreSchema, prompts: list[str], prompt_ids: list[str],
                       seeds: list[int], uncond: dict[str, np.ndarray | None],
                       existing: "TrajectoryStore | None" = None) -> "TrajectoryStore":
        """Resume the store at ``path`` if it has this identity, create it if absent, refuse otherwise.
        ``existing``: the store as :func:`check_compatible` found it already (checked, not reopened)."""
        if existing is None:
            existing = check_compatible(path, schema.identity())
        else:
            message = identity_mismatch(str(path), existing.schema, schema.identity())
            if message:
                raise ConfigMismatchError(message)
        if existing is None:
            return cls.create(path, schema, prompts, prompt_ids, seeds, uncond)
        return existing.writable()

    def writable(self) -> "TrajectoryStore":
        """This store opened for writing, its parsed schema reused."""
        return TrajectoryStore(self.path, group=_open_group(self.path, "r+"), schema=self.schema)

    # -- reading ------------------------------------------------------------------------------
    def complete_mask(self) -> np.ndarray:
        return np.asarray(self._group["complete"][:], dtype=bool)

    def complete_indices(self) -> np.ndarray:
        return np.flatnonzero(self.complete_mask())

    def _text_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._texts is None:
            g = self._group
            self._texts = (np.asarray(g["prompt"][:]), np.asarray(g["prompt_id"][:]), np.asarray(g["seed"][:]))
        return self._texts

    def read(self, i: int) -> TrajectoryRecord:
        """One trajectory with its conditioning and provenance."""
        if not 0 <= i < self.num:
            raise IndexError(f"trajectory {i} out of range [0, {self.num})")
        g = self._group
        prompts, ids, seeds = self._text_arrays()
        try:
            positions = g["positions"][i]
            conditioning = {name: g[name][i] if name in g else None for name in CONDITIONING}
        except Exception as err:  # checksum mismatch (ValueError), or a codec failing on a damaged frame
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DamagedTrajectoryError(self.path, int(i), first) from err
        return TrajectoryRecord(int(i), positions, conditioning, str(prompts[i]), str(ids[i]), int(seeds[i]))

    def uncond(self) -> dict[str, np.ndarray | None]:
        """The single unconditional row (1, …) the teacher's CFG used, keyed like a record's conditioning."""
        g = self._group
        return {name: g[f"uncond_{name}"][:] if f"uncond_{name}" in g else None for name in CONDITIONING}

    def prompts(self) -> list[str]:
        return [str(p) for p in self._text_arrays()[0]]

    def seeds(self) -> list[int]:
        return [int(s) for s in self._text_arrays()[2]]

    def pending_batches(self, start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
        """Batches [i0, i1) in [start, stop) with any incomplete trajectory.

        Batch edges sit at multiples of ``batch_size`` so that a resumed run (or a shard whose
        range starts on such a multiple) batches exactly as an uninterrupted run: identical
        batches give bit-identical results.
        """
        if not 0 <= start <= stop <= self.num:
            raise StoreError(f"{self.path}: index range [{start}, {stop}) is outside [0, {self.num})")
        done = self.complete_mask()
        edges = range(start - start % batch_size, stop, batch_size)
        spans = [(max(e, start), min(e + batch_size, stop)) for e in edges]
        return [(a, b) for a, b in spans if not done[a:b].all()]

    def arrays(self) -> dict[str, zarr.Array]:
        """Every array of the group by name (for inspection and verification)."""
        return {name: self._group[name] for name in sorted(self._group.array_keys())}

    # -- writing ------------------------------------------------------------------------------
    def write_batch(self, start: int, arrays: dict[str, np.ndarray | None]) -> None:
        """Write trajectories [start, start+B): data arrays first, the ``complete`` flags last."""
        b = len(arrays["positions"])
        for name in PER_TRAJECTORY:
            if name in self._group:
                self._group[name][start:start + b] = arrays[name]
        self._group["complete"][start:start + b] = True

    def mark_incomplete(self, indices: list[int]) -> None:
        """Clear ``complete`` for these trajectories, so the next generation run redoes exactly them."""
        for i in indices:
            self._group["complete"][int(i)] = False

    def writer(self, max_pending: int = 2) -> TrajectoryWriter:
        return TrajectoryWriter(self, max_pending)
