"""The export is derived data with a manifest, like a checkpoint: any changed, cut or missing
file is found; and two identical runs export identical bytes whatever the process's hash seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from rapm_testing.helpers import ROOT
from storage.manifest import MANIFEST, manifest_problem, write_manifest
from storage.run_dir import RunDir

EXPORT_SCRIPT = """
import sys, torch
from diffusers import UNet2DConditionModel
from rapm_core.distill.export import save_diffusers_lora
from rapm_core.distill.student import attach_lora, lora_config
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet")
config = lora_config(rank=2, lora_alpha=4)
attach_lora(unet, config, seed=0)
save_diffusers_lora(unet, config, sys.argv[2])
"""


def test_the_lora_file_does_not_depend_on_the_hash_seed(tmp_path, tiny_sd15_dir):
    """peft keeps target_modules as a set and diffusers writes it in set order, which follows
    PYTHONHASHSEED, and safetensors writes its metadata map in a per-process hash order: both
    are written sorted."""
    files = []
    for seed in ("1", "2", "3", "4"):
        out = tmp_path / f"export-{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(tiny_sd15_dir), str(out)], env=env, check=True,
                       capture_output=True, timeout=300)
        files.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert all(f == files[0] for f in files[1:])
    with safe_open(tmp_path / "export-1" / "pytorch_lora_weights.safetensors", "pt") as f:  # still a valid file
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] == 2
        assert all(f.get_tensor(k).numel() for k in f.keys())


def _export_like(root: Path) -> Path:
    export = root / "export"
    (export / "scheduler").mkdir(parents=True)
    (export / "pytorch_lora_weights.safetensors").write_bytes(b"weights" * 100)
    (export / "scheduler" / "scheduler_config.json").write_text("{}")
    (export / "inference.json").write_text("{}")
    write_manifest(export, {"step": 3})
    return export


@pytest.mark.parametrize("damage,problem", [
    (lambda e: (e / "pytorch_lora_weights.safetensors").unlink(), "pytorch_lora_weights.safetensors is missing"),
    (lambda e: (e / "pytorch_lora_weights.safetensors").open("r+b").truncate(100),
     "pytorch_lora_weights.safetensors has 100 bytes, manifest.json says 700"),
    (lambda e: (e / "scheduler" / "scheduler_config.json").write_text("[]"),
     "scheduler/scheduler_config.json does not match its sha256"),
    (lambda e: (e / MANIFEST).write_text("{"), "unreadable manifest.json"),
    (lambda e: (e / MANIFEST).unlink(), "no manifest.json"),
])
def test_a_damaged_export_is_found(tmp_path, damage, problem):
    export = _export_like(tmp_path)
    assert RunDir(tmp_path).export_problem() is None
    assert json.loads((export / MANIFEST).read_text())["step"] == 3
    damage(export)
    assert problem in RunDir(tmp_path).export_problem()


def test_a_run_dir_without_an_export_says_so(tmp_path):
    assert RunDir(tmp_path).export_problem() == "missing"
    assert manifest_problem(tmp_path).startswith("no manifest.json")
