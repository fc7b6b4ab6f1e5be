"""A refused command leaves no trace: its --out is not created (not even to hold the lock file),
and what makes it refuse is found before the run dir is claimed, so the same --out still takes a
valid config afterwards."""

from __future__ import annotations

import pytest

from rapm_testing.helpers import rapm_env, run_rapm


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir, make_store):
    return make_store(tmp_path_factory.mktemp("refused-store"), tiny_sd15_dir, num=1)


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("option,message", [
    (["--relative-offset", "99"], "--relative-offset 99 must be below the store's 2 teacher steps per slot (M)"),
    (["--iterations", "1000000000000000000000"], "--iterations: Input should be less than or equal to 1000000000"),
    (["--lr", "-1"], "--lr: Input should be greater than 0"),
])
def test_a_refused_distill_leaves_no_trace(tmp_path, store, option, message, rapm_in_process):
    out = tmp_path / "run"
    code, _, err = rapm_in_process(["distill", "--trajectories", str(store), "--out", str(out), "--device", "cpu",
                                    *option])
    line = _one_line(code, err)
    assert line.startswith("rapm distill: error: ") and message in line, line
    assert not out.exists()  # neither run.json (which would refuse every later config) nor the lock file


def test_a_refused_command_leaves_a_directory_it_did_not_make_as_it_was(tmp_path, store):
    out = tmp_path / "run"
    out.mkdir()
    code, _, err = run_rapm(["distill", "--trajectories", str(store), "--out", str(out), "--lr", "-1"],
                            rapm_env(tmp_path / "prefect"), tmp_path / "logs")  # as typed, in its own process
    _one_line(code, err)
    assert list(out.iterdir()) == []
