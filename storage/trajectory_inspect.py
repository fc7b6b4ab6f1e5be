"""Looking into a trajectory store without generating anything: what it is and how far it got."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.trajectory_store import DamagedTrajectoryError, TrajectoryStore


def inspect_store(store: TrajectoryStore | str) -> dict[str, Any]:
    """Identity, shapes, progress, size and compression of a store (opened already, or at a path)."""
    store = store if isinstance(store, TrajectoryStore) else TrajectoryStore(store)
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


@dataclass(frozen=True)
class VerifyReport:
    path: str
    checked: int  # complete trajectories read back
    damaged: list[int]  # their indices whose chunks fail to decode or to match their checksum
    reasons: dict[int, str]
    checksums: bool  # whether the store carries chunk checksums at all

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.checked} complete trajectories read, {len(self.damaged)} damaged"]
        if not self.checksums:
            out.append("this store carries no chunk checksums (made before they were written): only chunks that "
                       "no longer decode are found, silently changed values are not")
        out += [f"  trajectory {i}: {self.reasons[i]}" for i in self.damaged]
        return out


def verify_store(path: str) -> VerifyReport:
    """Read every chunk of every complete trajectory, as distillation would."""
    store = TrajectoryStore(path)
    reasons: dict[int, str] = {}
    done = store.complete_indices()
    for i in done:
        try:
            store.read(int(i))
        except DamagedTrajectoryError as err:
            reasons[int(i)] = err.reason
    return VerifyReport(store.path, len(done), sorted(reasons), reasons, store.schema.chunk_checksums)


def repair_store(path: str, damaged: list[int]) -> None:
    """Mark ``damaged`` incomplete: the next ``rapm trajectories`` with the store's options
    regenerates exactly their batches, bit-identical to the first time."""
    TrajectoryStore(path, writable=True).mark_incomplete(damaged)
