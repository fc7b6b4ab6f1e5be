import os
import random

import numpy as np
import pytest
import torch

from storage.checkpoints import Checkpoint, CheckpointStore, CorruptCheckpointWarning, decode_tree, encode_tree
from storage.errors import ConfigMismatchError, StoreError
from storage.run_dir import MetricsLog, RunDir


def _trained_optimizers(seed: int):
    """Two Adam optimizers after a few real steps, as the distiller has (LoRA and heads)."""
    torch.manual_seed(seed)
    student = torch.nn.Linear(3, 2)
    heads = torch.nn.Conv2d(2, 1, 1)
    opt_g = torch.optim.Adam(student.parameters(), lr=1e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.AdamW(heads.parameters(), lr=2e-3)
    for _ in range(3):
        opt_g.zero_grad(); student(torch.randn(4, 3)).square().mean().backward(); opt_g.step()
        opt_d.zero_grad(); heads(torch.randn(1, 2, 3, 3)).mean().backward(); opt_d.step()
    return student, heads, opt_g, opt_d


def _checkpoint(step: int, seed: int = 0) -> Checkpoint:
    student, heads, opt_g, opt_d = _trained_optimizers(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    torch.randn(5, generator=gen)
    random.seed(seed); np.random.seed(seed)
    return Checkpoint(
        step=step,
        trainable={**{f"lora.{k}": v for k, v in student.state_dict().items()},
                   **{f"heads.{k}": v for k, v in heads.state_dict().items()}},
        optimizer={"student": opt_g.state_dict(), "disc": opt_d.state_dict()},
        rng={"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": gen.get_state()},
        cursor={"epoch": 1, "position": 2, "consecutive_nonfinite": 0},
        metrics_lines=step, config={"rank": 1, "lr": 1e-4, "betas": [0.0, 0.99]}, config_hash="abc123",
    )


def test_round_trip_restores_training_state_exactly(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    ckpt = _checkpoint(4)
    path = store.save(ckpt)
    assert path.name == "step-0000004" and path.parent == tmp_path / "checkpoints"
    back = store.load()
    assert back.path == path and back.step == 4 and back.cursor == ckpt.cursor
    assert back.config == ckpt.config and back.config_hash == "abc123" and back.metrics_lines == 4
    assert back.trainable.keys() == ckpt.trainable.keys()
    assert all(torch.equal(back.trainable[k], v) for k, v in ckpt.trainable.items())

    # Optimizers restored from disk take the same next step as the originals.
    s1, h1, g1, d1 = _trained_optimizers(0)
    s2, h2, g2, d2 = _trained_optimizers(1)  # different weights and state, overwritten below
    s2.load_state_dict(s1.state_dict()); h2.load_state_dict(h1.state_dict())
    g2.load_state_dict(back.optimizer["student"]); d2.load_state_dict(back.optimizer["disc"])
    assert g2.state_dict()["param_groups"][0]["betas"] == (0.0, 0.99)
    x = torch.randn(4, 3)
    for s, g in ((s1, g1), (s2, g2)):
        g.zero_grad(); s(x).square().mean().backward(); g.step()
    assert all(torch.equal(a, b) for a, b in zip(s1.parameters(), s2.parameters()))

    # Every RNG continues with the same draws.
    random.setstate(back.rng["python"]); np.random.set_state(back.rng["numpy"]); torch.set_rng_state(back.rng["torch"])
    gen = torch.Generator(); gen.set_state(back.rng["generator"])
    drawn = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    random.setstate(ckpt.rng["python"]); np.random.set_state(ckpt.rng["numpy"]); torch.set_rng_state(ckpt.rng["torch"])
    gen.set_state(ckpt.rng["generator"])
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())


def test_tree_encoding_keeps_types():
    tree = {"state": {0: {"step": torch.tensor(3.0)}, 1: {}}, "groups": [{"betas": (0.9, 0.999), "x": None}],
            "np": ("MT19937", np.arange(4, dtype=np.uint32), 3, 0, 0.0), "nan": float("inf")}
    tensors = {}
    back = decode_tree(encode_tree(tree, tensors), tensors)
    assert list(back["state"]) == [0, 1] and torch.equal(back["state"][0]["step"], torch.tensor(3.0))
    assert back["groups"][0]["betas"] == (0.9, 0.999) and back["nan"] == float("inf")
    assert back["np"][1].dtype == np.uint32 and back["np"][1].tolist() == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="at /bad"):
        encode_tree({"bad": object()}, {})


def _flip_byte(path):
    f = path / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(path):
    f = path / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


@pytest.mark.parametrize("damage", [
    _flip_byte,
    _truncate,
    lambda p: (p / "rng.json").unlink(),
    lambda p: (p / "manifest.json").unlink(),
    lambda p: (p / "manifest.json").write_text("{not json"),
], ids=["flipped-byte", "truncated", "missing-file", "missing-manifest", "garbled-manifest"])
def test_corrupted_newest_falls_back_to_previous_with_warning(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_checkpoint(2, seed=0))
    newest = store.save(_checkpoint(4, seed=1))
    damage(newest)
    with pytest.warns(CorruptCheckpointWarning, match="step-0000004"):
        back = store.load()
    assert back.step == 2
    want = _checkpoint(2, seed=0).trainable
    assert all(torch.equal(back.trainable[k], v) for k, v in want.items())
    with pytest.raises(StoreError, match="step-0000004"):
        store.load(newest)


def test_all_corrupted_means_no_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    assert store.load() is None
    _flip_byte(store.save(_checkpoint(1)))
    with pytest.warns(CorruptCheckpointWarning):
        assert store.load() is None


def test_keeps_only_the_last_k(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (2, 4, 6, 8, 10):
        store.save(_checkpoint(step))
    assert [s for s, _ in store.steps()] == [8, 10]
    assert sorted(os.listdir(store.dir)) == ["step-0000008", "step-0000010"]


def test_failed_write_leaves_nothing_partial(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_checkpoint(2))
    bad = _checkpoint(4)
    bad.rng = {"python": random.getstate(), "unsupported": object()}  # fails after trainable is written
    with pytest.raises(TypeError):
        store.save(bad)
    assert sorted(os.listdir(store.dir)) == ["step-0000002"]
    assert store.load().step == 2


def test_save_clears_stale_temps_and_replaces_abandoned_step(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_checkpoint(2))
    _flip_byte(store.save(_checkpoint(4, seed=1)))
    (store.dir / ".tmp-step-0000006-killed").mkdir()
    (store.dir / ".tmp-step-0000006-killed" / "trainable.safetensors").write_bytes(b"partial")
    with pytest.warns(CorruptCheckpointWarning):
        assert store.load().step == 2  # a resumed run continues from 2 and reaches 4 again
    store.save(_checkpoint(4, seed=2))
    assert sorted(os.listdir(store.dir)) == ["step-0000002", "step-0000004"]
    assert store.verify(store.dir / "step-0000004") is None
    want = _checkpoint(4, seed=2).trainable
    assert all(torch.equal(store.load().trainable[k], v) for k, v in want.items())


def test_metrics_log_truncates_to_checkpoint_length(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for i in range(5):
        log.append({"iteration": i + 1})
    assert log.sync() == 5
    log.close()
    with open(log.path, "a") as f:
        f.write('{"iteration": 6')  # a line torn by a kill
    log.truncate(3)
    assert [r["iteration"] for r in log.read()] == [1, 2, 3]
    log.append({"iteration": 4})
    assert log.count() == 4
    # A log cut (or deleted) below its checkpoint's count is kept as it is; the caller says so.
    assert log.truncate(9) == 4 and log.count() == 4


def test_run_dir_refuses_other_config_or_store(tmp_path):
    run = RunDir(tmp_path / "run")
    record = {"config": {"method": {"rank": 1, "lr": 1e-4}}, "config_hash": "h1", "store_config_hash": "s1",
              "trajectories": [0, 2]}
    assert run.claim(record)["trajectories"] == [0, 2]
    assert run.claim({**record, "trajectories": [0, 1, 2]})["trajectories"] == [0, 2]  # first start wins
    other = {**record, "config": {"method": {"rank": 2, "lr": 1e-4}}, "config_hash": "h2"}
    with pytest.raises(ConfigMismatchError, match=r"differs in: method\.rank"):
        run.claim(other)
    with pytest.raises(ConfigMismatchError, match="store config hash"):
        run.claim({**record, "store_config_hash": "s2"})
    (tmp_path / "junk").mkdir(); (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(StoreError, match="no run.json"):
        RunDir(tmp_path / "junk").claim(record)


def test_replacing_swaps_a_directory_whole(tmp_path):
    run = RunDir(tmp_path)
    for text in ("old", "new"):
        with run.replacing("export") as tmp:
            (tmp / "weights").write_text(text)
    assert (tmp_path / "export" / "weights").read_text() == "new"
    with pytest.raises(RuntimeError):
        with run.replacing("export") as tmp:
            (tmp / "weights").write_text("broken")
            raise RuntimeError("export failed")
    assert (tmp_path / "export" / "weights").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
