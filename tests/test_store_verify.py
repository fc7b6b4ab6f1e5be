"""Damaged trajectory chunks are found, named and regenerated: CRC32C per chunk, `rapm store verify`,
`--repair`, and the one line distillation stops with."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from flows.cli import main as rapm_main
from rapm_core.distill.run import run_distillation
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_testing.helpers import run_config
from storage.trajectory_inspect import verify_store
from storage.trajectory_store import DamagedTrajectoryError, TrajectoryStore


def _flip(store: Path, index: int, array: str = "positions", offset: int | None = None) -> None:
    """Flip one byte of a trajectory's chunk file, as a failing disk or a bad copy would."""
    chunk = next(p for p in (store / array / "c" / str(index)).rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    chunk.write_bytes(bytes(data))


@pytest.fixture()
def store(tmp_path, tiny_sd15_dir, make_store):
    return make_store(tmp_path, tiny_sd15_dir, num=3)


def test_a_flipped_byte_is_found_named_and_regenerated_bit_identically(store, tmp_path, capsys):
    original = zarr.open_group(str(store), mode="r")["positions"][:]
    _flip(store, 1)
    with pytest.raises(DamagedTrajectoryError, match="trajectory 1 is damaged"):
        TrajectoryStore(str(store)).read(1)

    assert rapm_main(["store", "verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "3 complete trajectories read, 1 damaged" in out and "trajectory 1:" in out and "checksum" in out

    # distillation stops at it with one line naming the store, the trajectory and the command
    config = run_config(store, tmp_path / "run", iterations=6)
    with pytest.raises(DamagedTrajectoryError, match=r"rapm store verify .* --repair"):
        run_distillation(config, log=lambda _: None)

    assert rapm_main(["store", "verify", str(store), "--repair"]) == 0
    assert TrajectoryStore(str(store)).complete_indices().tolist() == [0, 2]
    config = TrajectoriesConfig.model_validate(TrajectoryStore(str(store)).schema.config)
    report = generate_trajectories(config, log=lambda _: None)
    assert report.generated == 3  # the batch holding it (batch size 3)
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["positions"][:], original)
    assert verify_store(str(store)).damaged == []


def test_a_damaged_embedding_chunk_is_found_too(store):
    _flip(store, 2, "prompt_embeds")
    assert verify_store(str(store)).damaged == [2]


def test_a_store_without_checksums_says_so(store, tmp_path):
    """Rewrite the positions without the CRC32C codec, as stores were written before it."""
    from zarr.codecs import BloscCodec

    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    g = zarr.open_group(str(old), mode="r+")
    data = g["positions"][:]
    del g["positions"]
    g.create_array("positions", shape=data.shape, chunks=(1, *data.shape[1:]), dtype=data.dtype,
                   compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"))[:] = data
    g.attrs.update({"chunk_checksums": False})
    report = verify_store(str(old))
    assert not report.checksums and report.damaged == []
    assert any("carries no chunk checksums" in line for line in report.lines())
