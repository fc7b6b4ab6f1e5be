"""The trajectory store: one Zarr v3 group holding a teacher's stored trajectories.

Layout (readable with plain ``zarr``; ``num`` trajectories, K = N·M fine steps):

- ``positions`` (num, K+1, C, H, W), store dtype, one trajectory per chunk, Blosc-compressed
- ``prompt_embeds`` (num, L, D); SDXL also ``pooled_prompt_embeds`` (num, P), ``time_ids`` (num, 6)
- ``uncond_prompt_embeds`` (1, L, D) (+ ``uncond_pooled_prompt_embeds``, ``uncond_time_ids``)
- ``prompt``, ``prompt_id`` (str), ``seed`` (int64): written whole when the store is created
- ``complete`` (num,) bool, one element per chunk, set only after that trajectory's data is written

Every per-trajectory array is chunked one trajectory per chunk, so writers in different processes
(shards) that own disjoint index ranges never touch the same file. Embeddings keep the teacher's
compute dtype (bf16 widened to float32): they are exact and small next to the positions.

A store is named by ``config_hash`` over the fields in ``IDENTITY_KEYS``; an existing store is
only ever resumed by a run with the same identity, never appended to by a different one.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from storage.errors import ConfigMismatchError, StoreError
from storage.hashing import config_hash

SCHEMA_VERSION = 1
# Everything that changes what a stored trajectory contains.
IDENTITY_KEYS = (
    "schema_version", "teacher", "teacher_revision", "kind", "scheduler_config", "num_slots",
    "steps_per_slot", "guidance", "seed", "compute_dtype", "store_dtype", "prompts_hash", "num", "latent_shape",
)
REQUIRED_ATTRS = ("teacher", "teacher_revision", "kind", "scheduler_config", "num_slots", "steps_per_slot",
                  "guidance", "seed", "compute_dtype", "prompts_hash")
_FIELD_NAMES = {"prompts_hash": "prompt set", "num": "number of trajectories", "teacher_revision": "teacher revision"}
# Chosen by measurement (benchmarks/trajectory_store_codecs.py, fp16, 41 positions per chunk):
# zstd-5 + byte shuffle 1.34× on smooth latents, 1.07× on noise-like tiny-teacher ones, ~30 MiB/s
# on one core; zstd-1/3 and lz4 stay ≤ 1.16×, zstd-7/9 gain ≤ 0.03× at 4–10× the time.
# Latents are noise-dominated in their low bits, so no lossless codec does much better.
POSITIONS_CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}
STORE_DTYPES = ("float16", "float32")
PER_TRAJECTORY = ("positions", "prompt_embeds", "pooled_prompt_embeds", "time_ids")


def identity(attrs: dict) -> dict:
    """The identity fields of ``attrs``; diffusers' bookkeeping keys (``_class_name``…) don't count."""
    ident = {k: attrs.get(k) for k in IDENTITY_KEYS}
    if isinstance(ident["scheduler_config"], dict):
        ident["scheduler_config"] = {k: v for k, v in ident["scheduler_config"].items() if not k.startswith("_")}
    return ident


def identity_hash(attrs: dict) -> str:
    return config_hash(identity(attrs))


@dataclass(frozen=True)
class TrajectoryLayout:
    num: int
    positions: tuple[int, int, int, int]  # (K+1, C, H, W)
    prompt_embeds: tuple[int, int]  # (L, D)
    pooled_dim: int | None = None  # SDXL only
    store_dtype: str = "float16"
    embed_dtype: str = "float32"

    @property
    def is_sdxl(self) -> bool:
        return self.pooled_dim is not None


def _open_group(path: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise StoreError(f"{path}: no trajectory store here; run `rapm trajectories` first") from err


def _mismatch(path: str, stored: dict, wanted: dict) -> str | None:
    a, b = identity(stored), identity(wanted)
    diffs = []
    for key in IDENTITY_KEYS:
        if key not in wanted or a[key] == b[key]:
            continue
        name = _FIELD_NAMES.get(key, key)
        if key in ("scheduler_config", "prompts_hash"):
            diffs.append(f"{name} differs")
        else:
            diffs.append(f"{name}: store has {a[key]!r}, this run wants {b[key]!r}")
    if not diffs:
        return None
    return (f"{path}: existing trajectory store was made with a different config ({'; '.join(diffs)}); "
            f"use another --out, or delete it to regenerate")


def check_compatible(path: str, attrs: dict) -> None:
    """Fail fast (before loading a teacher) if ``path`` holds a store whose identity differs on any given key."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return
    message = _mismatch(str(path), dict(group.attrs), attrs)
    if message:
        raise ConfigMismatchError(message)


class TrajectoryStore:
    """Reader (and, with ``writable=True``, batch writer) of an existing trajectory store."""

    def __init__(self, path: str, writable: bool = False):
        self.path = str(path)
        self._group = _open_group(self.path, "r+" if writable else "r")
        self.attrs: dict = dict(self._group.attrs)
        if self.attrs.get("schema_version") != SCHEMA_VERSION or "positions" not in self._group:
            raise StoreError(f"{self.path}: not a RAPM trajectory store of schema {SCHEMA_VERSION}")
        self.num: int = int(self.attrs["num"])
        self.is_sdxl = "pooled_prompt_embeds" in self._group
        self._texts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def create(cls, path: str, attrs: dict, layout: TrajectoryLayout, prompts: list[str], prompt_ids: list[str],
               seeds: list[int], uncond: dict[str, np.ndarray]) -> "TrajectoryStore":
        """Create an empty store: metadata, prompts, seeds and the uncond row; no trajectory is complete yet."""
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"trajectory store attrs lack {missing}")
        if layout.store_dtype not in STORE_DTYPES:
            raise StoreError(f"store dtype must be one of {STORE_DTYPES}, got {layout.store_dtype!r}")
        expected_k = attrs["num_slots"] * attrs["steps_per_slot"] + 1
        if layout.positions[0] != expected_k:
            raise ValueError(f"positions hold {layout.positions[0]} steps, N·M+1 = {expected_k}")
        if not len(prompts) == len(prompt_ids) == len(seeds) == layout.num:
            raise ValueError("prompts, prompt ids and seeds must all have one entry per trajectory")
        full = {
            **attrs, "schema_version": SCHEMA_VERSION, "num": layout.num, "store_dtype": layout.store_dtype,
            "embed_dtype": layout.embed_dtype, "latent_shape": list(layout.positions[1:]),
            "positions_codec": POSITIONS_CODEC,
        }
        full["config_hash"] = identity_hash(full)
        group = zarr.create_group(str(path), attributes=full)
        n, (L, D) = layout.num, layout.prompt_embeds

        def per_traj(name, shape, dtype, **kw):
            group.create_array(name, shape=(n, *shape), chunks=(1, *shape), dtype=dtype, **kw)

        per_traj("positions", layout.positions, layout.store_dtype, compressors=BloscCodec(**POSITIONS_CODEC))
        per_traj("prompt_embeds", (L, D), layout.embed_dtype)
        group.create_array("uncond_prompt_embeds", data=uncond["prompt_embeds"].astype(layout.embed_dtype))
        if layout.is_sdxl:
            per_traj("pooled_prompt_embeds", (layout.pooled_dim,), layout.embed_dtype)
            per_traj("time_ids", (6,), layout.embed_dtype)
            for name in ("pooled_prompt_embeds", "time_ids"):
                group.create_array(f"uncond_{name}", data=uncond[name].astype(layout.embed_dtype))
        group.create_array("prompt", shape=(n,), chunks=(n,), dtype=str)[:] = np.asarray(prompts, dtype=str)
        group.create_array("prompt_id", shape=(n,), chunks=(n,), dtype=str)[:] = np.asarray(prompt_ids, dtype=str)
        group.create_array("seed", data=np.asarray(seeds, dtype=np.int64), chunks=(n,))
        group.create_array("complete", shape=(n,), chunks=(1,), dtype=bool, fill_value=False)
        return cls(path, writable=True)

    @classmethod
    def open_or_create(cls, path: str, attrs: dict, layout: TrajectoryLayout, prompts: list[str],
                       prompt_ids: list[str], seeds: list[int], uncond: dict[str, np.ndarray]) -> "TrajectoryStore":
        """Resume the store at ``path`` if it has this identity, create it if absent, refuse otherwise."""
        try:
            existing = zarr.open_group(str(path), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return cls.create(path, attrs, layout, prompts, prompt_ids, seeds, uncond)
        wanted = {**attrs, "schema_version": SCHEMA_VERSION, "num": layout.num, "store_dtype": layout.store_dtype,
                  "latent_shape": list(layout.positions[1:])}
        message = _mismatch(str(path), dict(existing.attrs), wanted)
        if message:
            raise ConfigMismatchError(message)
        return cls(path, writable=True)

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

    def read(self, i: int) -> dict[str, Any]:
        """One trajectory: positions (K+1, C, H, W) in the store dtype, its conditioning and provenance."""
        if not 0 <= i < self.num:
            raise IndexError(f"trajectory {i} out of range [0, {self.num})")
        g = self._group
        prompts, ids, seeds = self._text_arrays()
        return {
            "positions": g["positions"][i],
            "prompt_embeds": g["prompt_embeds"][i],
            "pooled_prompt_embeds": g["pooled_prompt_embeds"][i] if self.is_sdxl else None,
            "time_ids": g["time_ids"][i] if self.is_sdxl else None,
            "prompt": str(prompts[i]),
            "prompt_id": str(ids[i]),
            "seed": int(seeds[i]),
        }

    def uncond(self) -> dict[str, np.ndarray | None]:
        """The single unconditional row (1, …) the teacher's CFG used."""
        g = self._group
        return {
            "prompt_embeds": g["uncond_prompt_embeds"][:],
            "pooled_prompt_embeds": g["uncond_pooled_prompt_embeds"][:] if self.is_sdxl else None,
            "time_ids": g["uncond_time_ids"][:] if self.is_sdxl else None,
        }

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

    # -- writing ------------------------------------------------------------------------------
    def write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write trajectories [start, start+B): data arrays first, the ``complete`` flags last."""
        b = len(arrays["positions"])
        for name in PER_TRAJECTORY:
            if name in self._group:
                self._group[name][start:start + b] = arrays[name]
        self._group["complete"][start:start + b] = True

    def writer(self, max_pending: int = 2) -> "TrajectoryWriter":
        return TrajectoryWriter(self, max_pending)


class TrajectoryWriter:
    """Writes batches on a background thread so compression and disk I/O overlap generation.

    The bounded queue caps the memory held by batches not yet written. Leaving the ``with`` block
    (also through an exception) writes everything already submitted before returning; a failed
    write is raised in the producer at its next ``submit`` or at exit.
    """

    def __init__(self, store: TrajectoryStore, max_pending: int = 2):
        self._store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.write_seconds = 0.0  # time the writer thread spent writing
        self.wait_seconds = 0.0  # time the producer was blocked on a full queue
        self._thread = threading.Thread(target=self._run, name="trajectory-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            start, arrays = item
            t0 = time.perf_counter()
            try:
                self._store.write_batch(start, arrays)
            except BaseException as err:  # surfaced to the producer
                self._error = err
            self.write_seconds += time.perf_counter() - t0

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StoreError(f"{self._store.path}: writing trajectories failed: {self._error}") from self._error

    def submit(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        self._raise_error()
        t0 = time.perf_counter()
        self._queue.put((start, arrays))
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except StoreError:
                pass  # the original exception is the one to report


def inspect_store(path: str) -> dict[str, Any]:
    """What a store is and how far it got: identity, shapes, progress, size and compression."""
    store = TrajectoryStore(path)
    g, a = store._group, store.attrs
    arrays = {name: g[name] for name in sorted(g.array_keys())}
    positions = arrays["positions"]
    pos_stored = positions.nbytes_stored()
    raw = positions.nchunks_initialized * int(np.prod(positions.chunks)) * positions.dtype.itemsize
    done = store.complete_indices()
    prompts = store.prompts()
    sample = [prompts[i] for i in (done if len(done) else range(store.num))[:3]]
    return {
        "path": store.path,
        "schema_version": a["schema_version"],
        "config_hash": a["config_hash"],
        "teacher": a["teacher"],
        "teacher_revision": a["teacher_revision"],
        "teacher_fingerprint": a.get("teacher_fingerprint"),
        "kind": a["kind"],
        "num_slots": a["num_slots"],
        "steps_per_slot": a["steps_per_slot"],
        "guidance": a["guidance"],
        "seed": a["seed"],
        "compute_dtype": a["compute_dtype"],
        "store_dtype": a["store_dtype"],
        "fine_timesteps": a.get("fine_timesteps"),
        "coarse_timesteps": a.get("coarse_timesteps"),
        "shapes": {name: list(arr.shape) for name, arr in arrays.items()},
        "dtypes": {name: str(arr.dtype) for name, arr in arrays.items()},
        "complete": int(len(done)),
        "total": store.num,
        "bytes_on_disk": int(sum(arr.nbytes_stored() for arr in arrays.values())),
        "positions_bytes_on_disk": int(pos_stored),
        "compression_ratio": round(raw / pos_stored, 3) if raw else None,
        "positions_codec": a.get("positions_codec"),
        "sample_prompts": sample,
    }

