"""The trajectory store on its own: schema, resume/refusal, batch writer, inspect, plain-zarr readability."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from storage.errors import ConfigMismatchError, StoreError
from storage.trajectory_inspect import inspect_store
from storage.trajectory_schema import StoreSchema
from storage.trajectory_store import TrajectoryStore, check_compatible

K1, C, H, W, L, D, P = 5, 4, 8, 8, 6, 10, 3  # N·M+1 = 5 (N=2, M=2)


def _schema(**kw) -> StoreSchema:
    base = dict(teacher="/teachers/tiny", teacher_revision=None, kind="sdxl",
                scheduler_config={"beta_start": 0.00085, "_class_name": "DDIMScheduler"}, num_slots=2,
                steps_per_slot=2, guidance=7.5, seed=0, compute_dtype="fp32", prompts_hash="abc",
                fine_timesteps=[999, 749, 499, 249], coarse_timesteps=[999, 499], num=4, latent_shape=(C, H, W),
                store_dtype="float32")
    return StoreSchema(**{**base, **kw})


def _uncond(sdxl=True) -> dict:
    return {"prompt_embeds": np.zeros((1, L, D)), "pooled_prompt_embeds": np.zeros((1, P)) if sdxl else None,
            "time_ids": np.array([[32, 32, 0, 0, 32, 32]]) if sdxl else None}


def _create(path, num=4, sdxl=True, **attrs) -> TrajectoryStore:
    return TrajectoryStore.open_or_create(
        str(path), _schema(kind="sdxl" if sdxl else "sd15", num=num, **attrs), [f"prompt {i}" for i in range(num)],
        [f"id{i}" for i in range(num)], [100 + i for i in range(num)], _uncond(sdxl))


def _batch(b: int, offset: float, sdxl=True, dtype="float32") -> dict:
    rng = np.random.default_rng(int(offset))
    out = {"positions": rng.standard_normal((b, K1, C, H, W)).astype(dtype),
           "prompt_embeds": np.full((b, L, D), offset, dtype="float32")}
    if sdxl:
        out["pooled_prompt_embeds"] = np.full((b, P), offset + 0.5, dtype="float32")
        out["time_ids"] = np.tile(np.array([32, 32, 0, 0, 32, 32], dtype="float32"), (b, 1))
    return out


def test_write_then_read_one_trajectory(tmp_path):
    store = _create(tmp_path / "s")
    assert store.num == 4 and store.complete_indices().tolist() == []
    batch = _batch(2, 1.0)
    store.write_batch(0, batch)
    reader = TrajectoryStore(str(tmp_path / "s"))
    assert reader.complete_indices().tolist() == [0, 1]
    rec = reader.read(1)
    np.testing.assert_array_equal(rec.positions, batch["positions"][1])
    assert rec.positions.shape == (K1, C, H, W) and rec.positions.dtype == np.float32
    assert rec.conditioning["prompt_embeds"].shape == (L, D)
    assert rec.conditioning["pooled_prompt_embeds"].tolist() == [1.5] * P
    assert rec.conditioning["time_ids"].tolist() == [32, 32, 0, 0, 32, 32]
    assert (rec.prompt, rec.prompt_id, rec.seed) == ("prompt 1", "id1", 101)
    assert isinstance(rec.prompt, str) and isinstance(rec.seed, int)
    assert reader.uncond()["time_ids"].shape == (1, 6)
    attrs = dict(zarr.open_group(str(tmp_path / "s"), mode="r").attrs)  # what a plain-zarr reader sees
    for key in ("num_slots", "steps_per_slot", "guidance", "teacher", "teacher_revision", "kind", "scheduler_config",
                "config_hash"):
        assert key in attrs
    assert reader.schema.config_hash == attrs["config_hash"] == reader.schema.identity_hash()
    assert reader.schema.chunk_checksums
    with pytest.raises(IndexError):
        reader.read(4)


def test_sd15_store_has_no_pooled_embeddings(tmp_path):
    store = _create(tmp_path / "s", sdxl=False)
    store.write_batch(2, _batch(2, 3.0, sdxl=False))
    rec = TrajectoryStore(str(tmp_path / "s")).read(3)
    assert rec.conditioning["pooled_prompt_embeds"] is None and rec.conditioning["time_ids"] is None
    assert "pooled_prompt_embeds" not in zarr.open_group(str(tmp_path / "s"), mode="r")


def test_same_identity_resumes_and_different_identity_is_refused(tmp_path):
    first = _create(tmp_path / "s")
    first.write_batch(0, _batch(2, 1.0))
    again = _create(tmp_path / "s")  # same config: resumes with what is there
    assert again.complete_indices().tolist() == [0, 1] and again.schema.config_hash == first.schema.config_hash
    with pytest.raises(ConfigMismatchError) as err:
        _create(tmp_path / "s", guidance=5.0, num_slots=3, steps_per_slot=1)
    message = str(err.value)
    assert "guidance: store has 7.5, this run wants 5.0" in message and "num_slots: store has 2" in message
    assert "steps_per_slot" in message and "use another --out" in message
    with pytest.raises(ConfigMismatchError, match="prompt set differs"):
        _create(tmp_path / "s", prompts_hash="other")
    with pytest.raises(ConfigMismatchError, match="teacher: store has '/teachers/tiny'"):
        check_compatible(str(tmp_path / "s"), {"teacher": "/teachers/other"})
    check_compatible(str(tmp_path / "nothing-here"), {"teacher": "x"})  # no store yet: nothing to refuse


def test_diffusers_bookkeeping_keys_do_not_change_identity(tmp_path):
    _create(tmp_path / "s")
    resumed = _create(tmp_path / "s", scheduler_config={"beta_start": 0.00085, "_class_name": "PNDMScheduler"})
    assert resumed.num == 4
    with pytest.raises(ConfigMismatchError, match="scheduler_config differs"):
        _create(tmp_path / "s", scheduler_config={"beta_start": 0.001})


def test_pending_batches_are_aligned_to_batch_size(tmp_path):
    store = _create(tmp_path / "s", num=7)
    store.write_batch(0, _batch(3, 1.0))
    store.write_batch(4, _batch(1, 2.0))  # batch [3, 6) is only partly done: redone whole
    assert store.pending_batches(0, 7, 3) == [(3, 6), (6, 7)]
    assert store.pending_batches(4, 7, 3) == [(4, 6), (6, 7)]
    assert store.pending_batches(0, 3, 3) == []
    with pytest.raises(StoreError):
        store.pending_batches(0, 8, 3)


def test_writer_flushes_submitted_batches_when_the_producer_fails(tmp_path):
    store = _create(tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        with store.writer(max_pending=1) as writer:
            writer.submit(0, _batch(2, 1.0))
            writer.submit(2, _batch(1, 2.0))
            raise KeyboardInterrupt
    assert TrajectoryStore(str(tmp_path / "s")).complete_indices().tolist() == [0, 1, 2]
    assert writer.write_seconds > 0


def test_a_failed_write_surfaces_and_leaves_the_trajectory_incomplete(tmp_path):
    store = _create(tmp_path / "s")
    bad = _batch(2, 1.0)
    bad["positions"] = bad["positions"][:, :2]  # wrong shape: zarr refuses the write
    with pytest.raises(StoreError, match="writing trajectories failed"):
        with store.writer() as writer:
            writer.submit(0, bad)
    assert TrajectoryStore(str(tmp_path / "s")).complete_indices().tolist() == []


def test_missing_or_foreign_store_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="no trajectory store here"):
        TrajectoryStore(str(tmp_path / "missing"))
    zarr.create_group(str(tmp_path / "foreign"))
    with pytest.raises(StoreError, match="not a RAPM trajectory store"):
        TrajectoryStore(str(tmp_path / "foreign"))


def test_inspect_reports_identity_progress_and_size(tmp_path):
    store = _create(tmp_path / "s")
    store.write_batch(0, _batch(2, 1.0))
    facts = inspect_store(str(tmp_path / "s"))
    assert (facts["complete"], facts["total"], facts["kind"], facts["num_slots"], facts["guidance"]) == (2, 4, "sdxl", 2, 7.5)
    assert facts["shapes"]["positions"] == [4, K1, C, H, W] and facts["dtypes"]["positions"] == "float32"
    assert facts["shapes"]["pooled_prompt_embeds"] == [4, P]
    assert facts["sample_prompts"] == ["prompt 0", "prompt 1"]
    assert facts["bytes_on_disk"] > facts["positions_bytes_on_disk"] > 0
    assert 0.5 < facts["compression_ratio"] < 2.0  # random normals barely compress
    assert facts["positions_codec"]["cname"] == "zstd"
    json.dumps(facts)


PLAIN_READER = """
import json, sys
import numpy as np, zarr
g = zarr.open_group(sys.argv[1], mode="r")
done = np.flatnonzero(g["complete"][:])
i = int(done[0])
print(json.dumps({
    "done": done.tolist(), "guidance": g.attrs["guidance"], "K1": g["positions"].shape[1],
    "first": float(g["positions"][i][0, 0, 0, 0]), "prompt": str(g["prompt"][i]), "seed": int(g["seed"][i]),
    "pooled": g["pooled_prompt_embeds"][i].tolist(),
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("storage", "rapm_core", "flows", "torch")),
}))
"""


def test_store_reads_with_plain_zarr_only(tmp_path):
    store = _create(tmp_path / "s")
    batch = _batch(2, 1.0)
    store.write_batch(2, batch)
    out = subprocess.run([sys.executable, "-c", PLAIN_READER, str(tmp_path / "s")], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    got = json.loads(out.stdout)
    assert got["done"] == [2, 3] and got["guidance"] == 7.5 and got["K1"] == K1
    assert got["first"] == pytest.approx(float(batch["positions"][0, 0, 0, 0, 0]))
    assert (got["prompt"], got["seed"], got["pooled"]) == ("prompt 2", 102, [1.5] * P)
    assert got["project_modules"] == []


def test_store_works_on_an_fsspec_url():
    url = "memory://rapm-tests/trajectories"
    _create(url).write_batch(2, _batch(2, 1.0))
    reader = TrajectoryStore(url)
    assert reader.complete_indices().tolist() == [2, 3] and reader.read(3).prompt == "prompt 3"
    assert inspect_store(url)["complete"] == 2


def test_a_store_written_before_checksums_and_fingerprints_stays_readable(tmp_path):
    """A store as the first schema-1 writers left it: no chunk checksums, no teacher fingerprint,
    positions compressed by Blosc alone (attributes written by hand, as that code did)."""
    from zarr.codecs import BloscCodec

    path = str(tmp_path / "old")
    attrs = {**_schema().identity(), "embed_dtype": "float32", "positions_codec": {"cname": "zstd", "clevel": 5,
             "shuffle": "shuffle"}, "prompt_store": {"path": "p", "split": "train", "limit": None, "config_hash": None}}
    attrs["config_hash"] = _schema().identity_hash()
    g = zarr.create_group(path, attributes=attrs)
    g.create_array("positions", shape=(4, K1, C, H, W), chunks=(1, K1, C, H, W), dtype="float32",
                   compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"))
    g.create_array("prompt_embeds", shape=(4, L, D), chunks=(1, L, D), dtype="float32")
    g.create_array("uncond_prompt_embeds", data=np.zeros((1, L, D), dtype="float32"))
    for name, values in (("prompt", [f"p{i}" for i in range(4)]), ("prompt_id", [f"i{i}" for i in range(4)])):
        g.create_array(name, shape=(4,), chunks=(4,), dtype=str)[:] = np.asarray(values, dtype=str)
    g.create_array("seed", data=np.arange(4, dtype=np.int64), chunks=(4,))
    g.create_array("complete", shape=(4,), chunks=(1,), dtype=bool, fill_value=False)
    g["positions"][1] = np.ones((K1, C, H, W), dtype="float32")
    g["complete"][1] = True

    store = TrajectoryStore(path)
    assert not store.schema.chunk_checksums and store.schema.teacher_fingerprint is None
    assert store.schema.config_hash == store.schema.identity_hash()
    assert store.complete_indices().tolist() == [1] and store.read(1).positions.sum() == K1 * C * H * W
    assert store.schema.prompt_store.samples_per_prompt == 1
    assert inspect_store(path)["chunk_checksums"] is False
