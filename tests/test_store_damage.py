"""A trajectory store whose Zarr metadata is damaged (a truncated or deleted ``zarr.json``) is one
line naming the damaged file, in every command that opens it, ``rapm store verify`` included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir, make_store):
    return make_store(tmp_path_factory.mktemp("damaged-store"), tiny_sd15_dir, num=2)


@pytest.fixture
def store_copy(tmp_path, store):
    return Path(shutil.copytree(store, tmp_path / "trajectories.zarr"))


def _error_line(command: str, args: list[str], rapm_in_process) -> str:
    code, _, err = rapm_in_process(args)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rapm {command}: error: "), err
    return lines[0].split(": error: ", 1)[1]


def _commands(store: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {"store inspect": ["store", "inspect", str(store)], "store verify": ["store", "verify", str(store)],
            "distill": ["distill", "--trajectories", str(store), "--out", str(tmp_path / "run"), "--device", "cpu"]}


@pytest.mark.parametrize("damaged,commands", [("zarr.json", ["store inspect", "store verify", "distill"]),
                                              ("positions/zarr.json", ["store verify"])])
def test_a_truncated_zarr_json_is_one_line_naming_it(tmp_path, store_copy, damaged, commands, rapm_in_process):
    (store_copy / damaged).open("r+b").truncate(100)
    for name, args in _commands(store_copy, tmp_path).items():
        if name not in commands:
            continue
        command = name.split()[0]
        message = _error_line(command, args, rapm_in_process)
        assert message.startswith(f"{store_copy}: damaged trajectory store: its {damaged} (Zarr metadata) "
                                  f"is not valid JSON"), (name, message)
    assert not (tmp_path / "run").exists()  # the refused distill left nothing behind


def test_a_store_without_its_root_zarr_json_is_called_damaged_not_missing(tmp_path, store_copy, rapm_in_process):
    (store_copy / "zarr.json").unlink()
    for name, args in _commands(store_copy, tmp_path).items():
        if name == "store inspect":  # opened the same way as by verify
            continue
        message = _error_line(name.split()[0], args, rapm_in_process)
        assert message.startswith(f"{store_copy}: damaged trajectory store: its root zarr.json "), (name, message)
        assert "positions" in message and "no trajectory store here" not in message
