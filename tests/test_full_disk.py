"""A disk that fills up during distillation: one line naming the run dir (exit 2), and the
checkpoints written before stay intact, so freeing space and re-running resumes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rapm_testing.helpers import rapm_env, run_rapm
from storage.checkpoints import CheckpointStore


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for about two checkpoints of the tiny run."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(tmp_path, small_disk, tiny_sd15_dir,
                                                                                 make_store):
    store = make_store(tmp_path, tiny_sd15_dir, num=1)
    run = small_disk / "run"
    code, out, err = run_rapm(["distill", "--trajectories", str(store), "--out", str(run), "--iterations", "20",
                               "--checkpoint-every", "1", "--keep-checkpoints", "20", "--disc-channels", "8",
                               "--device", "cpu"], rapm_env(tmp_path / "prefect"), tmp_path / "logs")
    assert code == 2, out + err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1] == (f"rapm distill: error: {run}: no space left on device; the checkpoints written before are "
                         f"intact; free space and run the same command to resume"), err
    assert len([line for line in lines if "error" in line.lower()]) == 1, err
    checkpoints = CheckpointStore(run)
    steps = checkpoints.steps()
    assert steps and all(checkpoints.verify(path) is None for _, path in steps)
    assert not list(Path(run).glob("**/.tmp-*"))  # the torn write was cleared
