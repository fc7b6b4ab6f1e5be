import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.pipeline import prepare
from rapm_core.pipeline import PipelineConfig
from rapm_shapes.demo import DEMO_RANK, DEMO_VALUES, DemoConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_shapes.shapes import all_prompts
from rapm_core.ingest.engine import ingest_prompts

TIMING = ("images_per_second", "seconds", "distill_seconds")


def _cli_args(work: Path, prompts: Path, teacher: Path) -> list[str]:
    return ["pipeline", "--work", str(work), "--prompts", str(prompts), "--teacher", str(teacher),
            "--trajectories-slots", "2", "--trajectories-steps-per-slot", "2", "--trajectories-guidance", "3",
            "--distill-iterations", "2", "--distill-checkpoint-every", "2", "--evaluate-num-images", "4",
            "--evaluate-batch-size", "4", "--device", "cpu", "--evaluate-evaluator", "none",
            "--distill-disc-channels", "8", "--ingest-eval-fraction", "0.4"]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1")  # no server: flows run directly
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
    assert _without_timing(again["samplers"]) == _without_timing(metrics["samplers"])
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
    config = PipelineConfig(work=str(tmp_path / "work"), prompts=str(prompts), teacher=str(tiny_sd15_dir),
                            device="cpu", ingest={"eval_fraction": 0.4},
                            trajectories={"slots": 2, "steps_per_slot": 2, "guidance": 3.0})
    prepare(config)
    ingest_prompts(config.ingest_config())
    generate_trajectories(config.trajectories_config(), log=lambda _: None)
    bad = [a if a != "3" else "5" for a in args]  # another guidance on the same work dir
    assert main(bad) == 2
    assert "different config" in capsys.readouterr().err


def test_demo_defaults_and_refinements():
    demo = DemoConfig()
    assert Path(demo.work) == Path("runs/demo") and Path(demo.teacher).name == "shapes-teacher"
    assert demo.prompts is None and demo.paths()["source"] == Path("runs/demo/prompts.txt")
    assert demo.distill.iterations == DEMO_VALUES["distill"]["iterations"] != PipelineConfig.model_fields[
        "distill"].default_factory().iterations
    assert demo.trajectories.model_dump(include=set(DEMO_VALUES["trajectories"])) == DEMO_VALUES["trajectories"]
    # An option refines its section: the demo's other values in that section stay.
    refined = DemoConfig(distill={"checkpoint_every": 50, "training": {"lr": 3e-4}})
    assert refined.distill.checkpoint_every == 50 and refined.distill.training.lr == 3e-4
    assert refined.distill.iterations == DEMO_VALUES["distill"]["iterations"]
    assert refined.distill.training.rank == demo.distill.training.rank == DEMO_RANK  # the section's other values stay
    run = demo.distill_config()
    assert run.iterations == demo.distill.iterations and run.method_config() == demo.distill.method_config()
    assert run.out == str(Path("runs/demo/run")) and run.seed == demo.seed
    ev = demo.evaluate_config()
    assert ev.trajectories == str(Path("runs/demo/trajectories.zarr")) and ev.num_images == demo.evaluate.num_images
    with pytest.raises(ValueError):
        PipelineConfig(teacher="t")  # the pipeline needs a work dir


def test_the_demo_trains_rank_4_and_the_readme_s_rank_1_option_parses_as_typed():
    from flows.cli import build_parser
    from flows.cli_model import model_from_args
    from rapm_core.distill.config import TrainingConfig

    assert DEMO_RANK == 4 != TrainingConfig().rank  # tuned on the embedded teacher, not the library's default
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    typed = "rapm demo --distill-rank 1"
    assert f"`{typed}`" in readme
    args = build_parser("demo").parse_args(typed.split()[1:])
    config = model_from_args(DemoConfig, args)
    assert config.distill.training.rank == 1 and config.distill.iterations == DEMO_VALUES["distill"]["iterations"]
    assert model_from_args(DemoConfig, build_parser("demo").parse_args(["demo"])).distill.training.rank == DEMO_RANK


def test_every_stage_option_is_reachable_from_the_pipeline():
    """Each stage config field is either derived by the pipeline or one of its stage's options."""
    from rapm_core.distill.config import DistillOptions, DistillRunConfig
    from rapm_core.evaluate.config import EvaluateConfig, EvaluateOptions
    from rapm_core.trajectories.config import TrajectoriesConfig, TrajectoriesOptions
    from rapm_core.ingest.config import IngestConfig, IngestOptions

    derived = {"source", "out", "prompts", "teacher", "revision", "seed", "device", "split", "trajectories", "run"}
    for full, options in ((IngestConfig, IngestOptions), (TrajectoriesConfig, TrajectoriesOptions),
                          (DistillRunConfig, DistillOptions), (EvaluateConfig, EvaluateOptions)):
        assert set(full.model_fields) - set(options.model_fields) <= derived, full
    config = PipelineConfig(work="w", teacher="t", trajectories={"store_dtype": "float32", "limit": 5,
                                                                 "execution": {"backend": "local-cluster"}},
                            distill={"keep_checkpoints": 7}, evaluate={"fid_reference": "real", "publish": "s3://b/r",
                                                                       "samplers": ["student"]})
    assert config.trajectories_config().store_dtype == "float32" and config.trajectories_config().limit == 5
    assert config.trajectories_config().execution.backend == "local-cluster"
    assert config.distill_config().keep_checkpoints == 7
    ev = config.evaluate_config()
    assert (ev.fid_reference, ev.publish, ev.samplers) == ("real", "s3://b/r", ["teacher_ref", "student"])
