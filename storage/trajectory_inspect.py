"""Looking into a trajectory store without generating anything: what it is and how far it got."""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.trajectory_store import TrajectoryStore


def inspect_store(path: str) -> dict[str, Any]:
    """Identity, shapes, progress, size and compression of the store at ``path``."""
    store = TrajectoryStore(path)
    s = store.schema
    arrays = store.arrays()
    positions = arrays["positions"]
    pos_stored = positions.nbytes_stored()
    raw = positions.nchunks_initialized * int(np.prod(positions.chunks)) * positions.dtype.itemsize
    done = store.complete_indices()
    prompts = store.prompts()
    sample = [prompts[i] for i in (done if len(done) else range(store.num))[:3]]
    return {
        "path": store.path,
        "schema_version": s.schema_version,
        "config_hash": s.config_hash,
        "teacher": s.teacher,
        "teacher_revision": s.teacher_revision,
        "teacher_fingerprint": s.teacher_fingerprint,
        "kind": s.kind,
        "num_slots": s.num_slots,
        "steps_per_slot": s.steps_per_slot,
        "guidance": s.guidance,
        "seed": s.seed,
        "compute_dtype": s.compute_dtype,
        "store_dtype": s.store_dtype,
        "fine_timesteps": s.fine_timesteps,
        "coarse_timesteps": s.coarse_timesteps,
        "shapes": {name: list(arr.shape) for name, arr in arrays.items()},
        "dtypes": {name: str(arr.dtype) for name, arr in arrays.items()},
        "complete": int(len(done)),
        "total": store.num,
        "bytes_on_disk": int(sum(arr.nbytes_stored() for arr in arrays.values())),
        "positions_bytes_on_disk": int(pos_stored),
        "compression_ratio": round(raw / pos_stored, 3) if raw else None,
        "positions_codec": s.positions_codec,
        "chunk_checksums": s.chunk_checksums,
        "sample_prompts": sample,
    }
