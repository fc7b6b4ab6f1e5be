"""An optional option (``float | None``) takes the word ``none``: clipping can be turned off and
LoRA alpha left to the rank from the command line, as typed."""

from __future__ import annotations

import json

from rapm_testing.helpers import ROOT


def test_grad_clip_none_turns_clipping_off_as_typed(rapm_in_process):
    teacher = ROOT / "assets" / "shapes-teacher"
    args = ["plan", "--teacher", str(teacher), "--slots", "2", "--steps-per-slot", "2", "--json"]
    code, out, err = rapm_in_process([*args, "--grad-clip", "none", "--lora-alpha", "None"])
    assert code == 0, err[-2000:]
    training = json.loads(out)["method"]["training"]
    assert training["grad_clip"] is None and training["lora_alpha"] is None
    code, out, err = rapm_in_process([*args, "--grad-clip", "0.5"])
    assert code == 0 and json.loads(out)["method"]["training"]["grad_clip"] == 0.5, err[-2000:]
