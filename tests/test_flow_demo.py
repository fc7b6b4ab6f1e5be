"""``rapm demo-flow``: the demo on the embedded rectified-flow teacher. Its config is the flow
teacher with its own values (rapm_shapes/demo.py), options refine them section by section, and the
README's command, typed as there with only the sizes shrunk, runs all four stages on that teacher
with those values, then answers "already complete"."""

from __future__ import annotations

from pathlib import Path

from rapm_core.pipeline import STAGES
from rapm_shapes.assets import EMBEDDED_FLOW_TEACHER
from rapm_shapes.demo import DEMO_VALUES, FLOW_DEMO_VALUES, DemoConfig, FlowDemoConfig
from storage.trajectory_store import TrajectoryStore
from test_sd3_distill import readme_flow_commands

# The README's command is given these too, so that it runs in seconds on a CPU: 6 prompts (4
# train, 2 eval), N=2, M=2, 2 iterations, 2 images, no evaluator. The demo's other values stay.
TINY = ["--device", "cpu", "--ingest-limit", "6", "--ingest-eval-fraction", "0.3", "--trajectories-slots", "2",
        "--trajectories-steps-per-slot", "2", "--distill-iterations", "2", "--distill-checkpoint-every", "2",
        "--distill-preview-prompts", "0", "--evaluate-num-images", "2", "--evaluate-batch-size", "2",
        "--evaluate-evaluator", "none"]


def test_the_flow_demo_is_the_flow_teacher_with_its_own_values():
    demo = FlowDemoConfig()
    assert Path(demo.teacher) == EMBEDDED_FLOW_TEACHER and Path(demo.work) == Path(FLOW_DEMO_VALUES["work"])
    assert Path(demo.work) != Path(DemoConfig().work)  # never resumes the UNet demo's work dir
    for section in ("trajectories", "distill", "evaluate"):
        values = FLOW_DEMO_VALUES[section]
        assert getattr(demo, section).model_dump(include=set(values)) == values, section
    assert demo.trajectories.max_sequence_length == 16  # what the flow teacher was trained with
    # An option refines its section; the demo's other values there stay, and the UNet demo's are untouched.
    refined = FlowDemoConfig(trajectories={"guidance": 3.0})
    assert refined.trajectories.guidance == 3.0 and refined.trajectories.max_sequence_length == 16
    assert DemoConfig().trajectories.model_dump(include=set(DEMO_VALUES["trajectories"])) == DEMO_VALUES["trajectories"]


def test_rapm_demo_flow_as_typed_runs_every_stage_on_the_flow_teacher_then_is_complete(
        rapm_in_process, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's work dir is relative: runs/demo-flow here
    [typed] = [argv for argv in readme_flow_commands() if argv[1] == "demo-flow"]
    argv = typed[1:] + TINY
    code, out, err = rapm_in_process(argv)
    assert code == 0, err[-2000:]
    assert all(f"{stage}: ran in" in out for stage in STAGES), out
    assert "| RAPM student 2 steps |" in out
    store = TrajectoryStore(str(tmp_path / FLOW_DEMO_VALUES["work"] / "trajectories.zarr")).schema
    assert Path(store.teacher) == EMBEDDED_FLOW_TEACHER and store.kind == "sd3"
    values = FLOW_DEMO_VALUES["trajectories"]
    assert (store.guidance, store.max_sequence_length) == (values["guidance"], values["max_sequence_length"])

    code, out, err = rapm_in_process(argv)
    assert code == 0, err[-2000:]
    assert all(f"{stage}: skipped (already complete)" in out for stage in STAGES), out
