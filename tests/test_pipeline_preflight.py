"""`rapm pipeline` refuses, before its first stage runs, what a later stage would refuse: an
empty eval or train split, an option that does not fit the trajectories, a missing FID or CLIP
file, a teacher that cannot load. Nothing is generated or trained first."""

from __future__ import annotations

import pytest

from rapm_core.errors import ConfigError
from rapm_core.pipeline import PipelineConfig, preflight
from rapm_shapes.shapes import all_prompts


def _args(work, prompts, teacher, *extra: str) -> list[str]:
    return ["pipeline", "--work", str(work), "--prompts", str(prompts), "--teacher", str(teacher),
            "--trajectories-slots", "2", "--trajectories-steps-per-slot", "2", "--distill-iterations", "2",
            "--evaluate-num-images", "2", "--evaluate-evaluator", "none", "--device", "cpu", *extra]


def _prompts(tmp_path, n: int):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(all_prompts()[:n]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("n,extra,problem", [
    (6, ["--ingest-eval-fraction", "0"], "leave the eval split empty"),
    (1, [], "leave the eval split empty"),
    (6, ["--distill-relative-offset", "5"], "--distill-relative-offset 5 must be below --trajectories-steps-per-slot 2"),
], ids=["fraction-0", "one-prompt", "relative-offset"])
def test_pipeline_refuses_before_the_first_stage(tmp_path, tiny_sd15_dir, n, extra, problem,
                                                 rapm_in_process):
    work = tmp_path / "work"
    code, out, err = rapm_in_process(_args(work, _prompts(tmp_path, n), tiny_sd15_dir, *extra))
    assert code == 2, out + err
    assert err.startswith("rapm pipeline: error: ") and problem in err and err.count("\n") == 1, err
    assert not (work / "prompts").exists() and not (work / "trajectories.zarr").exists(), "a stage ran"


def test_preflight_names_missing_evaluation_files_and_teachers(tmp_path, tiny_sd15_dir):
    base = dict(work=str(tmp_path / "w"), prompts=str(_prompts(tmp_path, 6)), teacher=str(tiny_sd15_dir), device="cpu")
    preflight(PipelineConfig(**base))
    for evaluate, problem in (({"fid_weights": str(tmp_path / "inception.pth")}, "Inception weights"),
                              ({"fid_reference": str(tmp_path / "real")}, "--fid-reference"),
                              ({"clip_model": str(tmp_path / "clip")}, "CLIP model")):
        with pytest.raises(ConfigError, match=problem):
            preflight(PipelineConfig(**base, evaluate=evaluate))
    with pytest.raises(ConfigError, match="no such directory"):
        preflight(PipelineConfig(**{**base, "teacher": str(tmp_path / "no-teacher")}))
