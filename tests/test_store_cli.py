"""``rapm store inspect|show`` on a real store made by the tiny SD 1.5 teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flows.cli import main as rapm_main
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store
from storage.teacher_fingerprint import teacher_fingerprint

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir):
    root = tmp_path_factory.mktemp("store-cli")
    write_prompt_store(root / "prompts", [PromptRecord(prompt_id(t), t, "train") for t in PROMPTS])
    config = TrajectoriesConfig(prompts=str(root / "prompts"), teacher=str(tiny_sd15_dir), out=str(root / "store"),
                                slots=2, steps_per_slot=2, batch_size=2, device="cpu")
    generate_trajectories(config, stop=2, log=lambda _m: None)  # [0, 2) done, trajectory 2 missing
    return config


def test_inspect_json(store, capsys, tiny_sd15_dir):
    assert rapm_main(["store", "inspect", store.out, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["teacher"] == str(tiny_sd15_dir.resolve()) and facts["kind"] == "sd15"
    assert facts["teacher_fingerprint"] == teacher_fingerprint(tiny_sd15_dir)
    assert (facts["num_slots"], facts["steps_per_slot"], facts["guidance"]) == (2, 2, 7.5)
    assert (facts["complete"], facts["total"]) == (2, 3)
    assert facts["shapes"]["positions"] == [3, 5, 4, 16, 16] and facts["shapes"]["prompt_embeds"] == [3, 32, 32]
    assert facts["store_dtype"] == "float16" and facts["dtypes"]["positions"] == "float16"
    assert facts["fine_timesteps"] == [999, 749, 499, 249] and facts["coarse_timesteps"] == [999, 499]
    assert facts["sample_prompts"] == PROMPTS[:2]
    assert facts["bytes_on_disk"] > facts["positions_bytes_on_disk"] > 0 and facts["compression_ratio"] > 0.5
    assert len(facts["config_hash"]) == 64


def test_inspect_text(store, capsys):
    assert rapm_main(["store", "inspect", store.out]) == 0
    out = capsys.readouterr().out
    assert "complete: 2" in out and "positions (3, 5, 4, 16, 16)" in out and "a red circle | a blue square" in out


def test_show_writes_a_labelled_strip(store, tmp_path, capsys):
    png = tmp_path / "strip.png"
    assert rapm_main(["store", "show", store.out, "--index", "1", "--out", str(png), "--device", "cpu"]) == 0
    assert "a blue square" in capsys.readouterr().out
    image = Image.open(png)
    assert image.size == (3 * 128, 2 * (14 + 128))  # N+1 columns of 128-px tiles, two labelled rows
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tile = pixels[14:14 + 128, 128:256]  # Z[M]: a decoded latent, not blank canvas
    assert tile.std() > 1.0


def test_show_refuses_an_incomplete_trajectory(store, tmp_path, capsys):
    code = rapm_main(["store", "show", store.out, "--index", "2", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "trajectory 2 is not complete" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_inspect_of_a_missing_store_is_one_line(tmp_path, capsys):
    assert rapm_main(["store", "inspect", str(tmp_path / "nope")]) == 2
    assert "no trajectory store here" in capsys.readouterr().err
