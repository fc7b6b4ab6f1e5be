"""An optional option (``float | None``) takes the word ``none``: clipping can be turned off and
LoRA alpha left to the rank from the command line, as typed."""

from __future__ import annotations

import json

from flows.cli import main
from rapm_testing.helpers import ROOT


def test_grad_clip_none_turns_clipping_off_as_typed(capsys):
    teacher = ROOT / "assets" / "shapes-teacher"
    args = ["plan", "--teacher", str(teacher), "--slots", "2", "--steps-per-slot", "2", "--json"]
    assert main([*args, "--grad-clip", "none", "--lora-alpha", "None"]) == 0, capsys.readouterr().err[-2000:]
    training = json.loads(capsys.readouterr().out)["method"]["training"]
    assert training["grad_clip"] is None and training["lora_alpha"] is None
    assert main([*args, "--grad-clip", "0.5"]) == 0, capsys.readouterr().err[-2000:]
    assert json.loads(capsys.readouterr().out)["method"]["training"]["grad_clip"] == 0.5
