"""`rapm store inspect` shows a long prompt cut to one short line (its --json keeps it whole)."""

from __future__ import annotations

import json

from flows.cli import main as rapm_main
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

LONG = "a red circle " + "and more detail " * 600


def test_inspect_cuts_a_long_prompt(tmp_path, tiny_sd15_dir, capsys):
    write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id(LONG), LONG, "train")])
    config = TrajectoriesConfig(prompts=str(tmp_path / "prompts"), teacher=str(tiny_sd15_dir),
                                out=str(tmp_path / "store"), slots=2, steps_per_slot=2, device="cpu")
    generate_trajectories(config, log=lambda _m: None)
    capsys.readouterr()
    assert rapm_main(["store", "inspect", config.out]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "sample_prompts" in l)
    assert line.endswith("…") and "a red circle and more detail" in line and len(line) < 120
    assert rapm_main(["store", "inspect", config.out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sample_prompts"] == [LONG]
