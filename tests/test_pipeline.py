import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.pipeline import (
    DEMO_METHOD,
    DemoConfig,
    PipelineConfig,
    distill_config,
    evaluate_config,
    ingest_config,
    paths,
    prepare,
    trajectories_config,
)
from flows.trajectories import generate_trajectories
from rapm_core.embedded.shapes import all_prompts
from storage.prompt_sources import ingest_prompts

TIMING = ("images_per_second", "seconds", "distill_seconds")


def _cli_args(work: Path, prompts: Path, teacher: Path) -> list[str]:
    return ["pipeline", "--work", str(work), "--prompts", str(prompts), "--teacher", str(teacher), "--slots", "2",
            "--steps-per-slot", "2", "--guidance", "3", "--iterations", "2", "--checkpoint-every", "2",
            "--num-images", "4", "--eval-batch-size", "4", "--device", "cpu", "--evaluator", "none",
            "--disc-channels", "8", "--eval-fraction", "0.4"]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_pipeline_runs_every_stage_then_resumes_and_skips(tmp_path, tiny_sd15_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(all_prompts()[::7][:12]) + "\n", encoding="utf-8")
    work = tmp_path / "work"
    args = _cli_args(work, prompts, tiny_sd15_dir)

    first = _run(args, tmp_path)
    for stage in ("ingest", "trajectories", "distill", "evaluate"):
        assert f"{stage}: ran in" in first.stdout
    eval_dir = work / "run" / "eval"
    for name in ("metrics.json", "grid.png", "metrics.png", "trajectory.png", "report.md"):
        assert (eval_dir / name).is_file()
    assert f"report: {eval_dir / 'report.md'}" in first.stdout
    assert "| RAPM student 2 steps |" in first.stdout
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    export = (work / "run" / "export" / "pytorch_lora_weights.safetensors").read_bytes()

    # Interrupted before the evaluation finished: only that stage runs again, to the same numbers.
    shutil.rmtree(eval_dir)
    second = _run(args, tmp_path)
    for stage in ("ingest", "trajectories", "distill"):
        assert f"{stage}: skipped (already complete)" in second.stdout
    assert "evaluate: ran in" in second.stdout
    again = json.loads((eval_dir / "metrics.json").read_text())
    assert _without_timing(again["methods"]) == _without_timing(metrics["methods"])
    assert (work / "run" / "export" / "pytorch_lora_weights.safetensors").read_bytes() == export

    # Everything complete: no flow run at all, the table printed from metrics.json.
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(f"{s}: skipped (already complete)" in out for s in ("ingest", "trajectories", "distill", "evaluate"))
    assert "| RAPM student 2 steps |" in out


def test_a_changed_stage_option_is_refused_not_mixed(tmp_path, tiny_sd15_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(all_prompts()[:6]) + "\n", encoding="utf-8")
    args = _cli_args(tmp_path / "work", prompts, tiny_sd15_dir)
    config = PipelineConfig(work=str(tmp_path / "work"), prompts=str(prompts), teacher=str(tiny_sd15_dir), slots=2,
                            steps_per_slot=2, guidance=3.0, device="cpu", eval_fraction=0.4)
    prepare(config)
    ingest_prompts(ingest_config(config))
    generate_trajectories(trajectories_config(config), log=lambda _: None)
    bad = [a if a != "3" else "5" for a in args]  # another guidance on the same work dir
    assert main(bad) == 2
    assert "different config" in capsys.readouterr().err


def test_demo_defaults_and_method_overrides():
    demo = DemoConfig()
    assert Path(demo.work) == Path("runs/demo") and Path(demo.teacher).name == "shapes-teacher"
    assert demo.prompts is None and paths(demo)["source"] == Path("runs/demo/prompts.txt")
    assert demo.method.model_dump(include=set(DEMO_METHOD)) == DEMO_METHOD
    refined = DemoConfig(method={"lr": 3e-4})
    assert refined.method.lr == 3e-4
    assert refined.method.model_dump(include=set(DEMO_METHOD) - {"lr"}) == {k: v for k, v in DEMO_METHOD.items()
                                                                             if k != "lr"}
    run = distill_config(demo)
    assert run.iterations == demo.iterations and run.method == demo.method
    ev = evaluate_config(demo)
    assert ev.trajectories == str(Path("runs/demo/trajectories.zarr")) and ev.num_images == demo.num_images
    with pytest.raises(ValueError):
        PipelineConfig()  # the pipeline needs a work dir
