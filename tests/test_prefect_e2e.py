"""The pipeline operated the Prefect way, end to end, on a real server: `scripts/stack.sh up`
(what `make up` runs) starts the server, creates the pool and the zombie automation, deploys
prefect.yaml and starts a worker; the pipeline deployment then runs a tiny config to completion,
and a second run loses its worker and flow-run process to SIGKILL mid-distillation, is marked
Crashed by the automation, is resumed with `prefect flow-run retry`, and ends with exactly the
LoRA of the uninterrupted run. A `rapm` command run with the stack's `PREFECT_API_URL` records its
flow run there. The stack is stopped by PID in the fixture's teardown, pass or fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterId, FlowRunFilterName, LogFilter, LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from safetensors.torch import load_file

from flows.ingest import run_name as ingest_run_name
from flows.sample import run_name as sample_run_name
from rapm_core.ingest.config import IngestConfig
from rapm_core.pipeline import PipelineConfig
from rapm_core.sample import SampleConfig
from rapm_testing.helpers import ROOT
from storage.manifest import write_manifest

LORA = Path("run") / "export" / "pytorch_lora_weights.safetensors"
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}

# Under pytest-xdist, every test here runs on one worker, so the session's stack starts once.
pytestmark = pytest.mark.xdist_group("prefect_stack")


def _deployments() -> dict[tuple[str, str], dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {(d["name"], d["entrypoint"]): d for d in spec["deployments"]}


def test_demo_deployments_carry_the_demo_configs():
    """The flows take a required config and know nothing of the shapes domain; prefect.yaml's
    deployments pass a demo's config for each flow (rapm_shapes/demo.py, the one place its values
    live; rapm_shapes/deployments.py writes them), paths relative to the project dir they run in:
    `rapm demo`'s as every flow's embedded-demo, `rapm demo-flow`'s as the pipeline's embedded-flow-demo."""
    import importlib
    import inspect
    import os
    import subprocess
    import sys
    import typing

    from rapm_shapes.deployments import DEPLOYMENTS, PIPELINE, _relative, deployment_parameters, with_parameters
    from rapm_shapes.demo import demo_config, flow_demo_config

    text = (ROOT / "prefect.yaml").read_text()
    assert with_parameters(text, deployment_parameters()) == text  # up to date: the generator changes nothing
    made = subprocess.run([sys.executable, "-m", "rapm_shapes.deployments"], cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0 and (ROOT / "prefect.yaml").read_text() == text, made.stderr[-2000:]
    deployments = _deployments()
    assert len(deployments) == len(yaml.safe_load(text)["deployments"])  # no (name, entrypoint) twice
    assert set(deployments) == set(DEPLOYMENTS)
    cwd = os.getcwd()
    for (name, entrypoint), deployment in deployments.items():
        assert deployment["work_pool"]["name"] == "rapm-local"
        path, function = entrypoint.split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert inspect.signature(flow.fn).parameters["config"].default is inspect.Parameter.empty, entrypoint
        model = typing.get_type_hints(flow.fn)["config"]
        os.chdir(ROOT)  # where the deployment's runs start (prefect.yaml's pull step)
        try:
            given = model.model_validate(deployment["parameters"]["config"])
        finally:
            os.chdir(cwd)
        wanted = DEPLOYMENTS[(name, entrypoint)]()
        assert _relative(given.model_dump(mode="json")) == _relative(wanted.model_dump(mode="json")), (name, entrypoint)
    # Each pipeline deployment is its demo exactly: `rapm demo`'s, and `rapm demo-flow`'s on the flow teacher.
    for name, demo in (("embedded-demo", demo_config()), ("embedded-flow-demo", flow_demo_config())):
        given = PipelineConfig.model_validate(deployments[(name, PIPELINE)]["parameters"]["config"])
        assert _relative(given.model_dump(mode="json")) == _relative(demo.model_dump(mode="json")), name
    assert "shapes-flow-teacher" in deployments[("embedded-flow-demo", PIPELINE)]["parameters"]["config"]["teacher"]
    # No stage flow (nor the pipeline) imports the demo.
    modules = ", ".join(sorted({path.removesuffix(".py").replace("/", ".") for path, _ in
                                (e.split(":") for _, e in DEPLOYMENTS)}))
    probe = f"import sys, {modules}; print('rapm_shapes.demo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def _params(work: Path, teacher: Path) -> dict:
    # The built-in prompts cut to 6 (4 train, 2 eval with this split), N=2, M=2, 12 iterations.
    return {"config": {
        "work": str(work), "teacher": str(teacher), "device": "cpu",
        "ingest": {"limit": 6, "eval_fraction": 0.3},
        "trajectories": {"slots": 2, "steps_per_slot": 2, "guidance": 3.0},
        "distill": {"iterations": 12, "checkpoint_every": 3, "training": {"lr": 0.01},
                    "adversarial": {"disc_channels": 8, "lr_disc": 0.01}},
        "evaluate": {"num_images": 2, "batch_size": 2, "evaluator": "none"},
    }}


def _logs(stack, run_id: UUID) -> str:
    with stack.client() as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def _check_monitoring(stack, run_id: UUID, teacher: str) -> None:
    """Each stage is a named subflow; long stages report progress and end with a table."""
    runs = {r.name.split("-")[0]: r for r in stack.subflow_runs(run_id)}
    assert set(runs) == {"ingest", "trajectories", "distill", "evaluate"}, [r.name for r in runs.values()]
    h = "[0-9a-f]{8}"
    assert re.fullmatch(rf"ingest-prompts\.txt-{h}", runs["ingest"].name)
    assert re.fullmatch(rf"trajectories-{teacher}-{h}", runs["trajectories"].name)
    assert re.fullmatch(rf"distill-{teacher}-{h}", runs["distill"].name)
    assert re.fullmatch(rf"evaluate-run-{h}", runs["evaluate"].name)
    with stack.client() as client:
        for stage, run in runs.items():
            assert run.state_type == StateType.COMPLETED, (stage, run.state)
            artifacts = sorted(client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))),
                               key=lambda a: a.created)
            kinds = [a.type for a in artifacts]
            assert "table" in kinds, (stage, kinds)
            if stage != "ingest":
                progress = [a for a in artifacts if a.type == "progress"]
                assert len(progress) == 1 and float(progress[0].data) == 100.0, (stage, progress)
                assert kinds.index("progress") < kinds.index("table"), (stage, kinds)
                assert "/s, ETA" in progress[0].description, (stage, progress[0].description)  # rate and ETA
            if stage == "distill":  # the loss curves, an image refreshed at every checkpoint (12 its, every 3)
                curves = [a for a in artifacts if (a.key or "").endswith("-loss-curves")]
                assert len(curves) == 4 and all("data:image/png;base64," in a.data for a in curves), curves
                previews = [a for a in artifacts if (a.key or "").endswith("-previews")]  # and the samples
                assert len(previews) == 4 and all("data:image/png;base64," in a.data for a in previews), previews
        pipeline_artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert [a.key for a in pipeline_artifacts] == ["rapm-pipeline"]


@pytest.mark.slow
def test_pipeline_deployment_completes_and_resumes_after_its_worker_is_killed(prefect_stack, tiny_sd15_dir, tmp_path):
    from flows.pipeline import pipeline_flow

    stack, deployment = prefect_stack, f"{pipeline_flow.name}/embedded-demo"
    timings = stack.timings

    # 1. Uninterrupted run, watched from the CLI as a user would.
    a = tmp_path / "a"
    t0 = time.perf_counter()
    run_a, proc = stack.run_deployment(deployment, _params(a, tiny_sd15_dir), watch=True)
    timings["pipeline run"] = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert stack.flow_run(run_a).state_type == StateType.COMPLETED
    _check_monitoring(stack, run_a, tiny_sd15_dir.name)
    for output in (LORA, Path("run/eval/report.md"), Path("run/eval/metrics.json"), Path("trajectories.zarr/zarr.json")):
        assert (a / output).is_file(), output

    # 2. Same config in another work dir; its worker and flow-run process die after a checkpoint.
    b = tmp_path / "b"
    run_b, _ = stack.run_deployment(deployment, _params(b, tiny_sd15_dir), watch=False)
    deadline = time.monotonic() + 300
    while not list((b / "run" / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline, f"no checkpoint in 300 s\n{stack.log('worker')[-3000:]}"
        assert stack.flow_run(run_b).state_type not in TERMINAL, stack.flow_run(run_b).state
        time.sleep(0.2)
    stack.kill_worker_and_its_runs()
    t_killed = time.perf_counter()
    assert not (b / LORA).exists(), "the run finished before it could be killed"
    # Nothing reports a SIGKILLed run: it stays Running, which `flow-run retry` refuses...
    assert stack.flow_run(run_b).state_type == StateType.RUNNING
    refused = stack.prefect("flow-run", "retry", str(run_b))
    assert refused.returncode != 0 and "cannot be retried" in " ".join((refused.stdout + refused.stderr).split())
    # ...until the zombie automation marks it Crashed; meanwhile `make up` brings a new worker.
    timings["up (worker restart)"] = stack.up()
    crashed = stack.wait_for_state(run_b, {StateType.CRASHED}, timeout=stack.zombie_after_s + 120)
    timings["kill → Crashed"] = time.perf_counter() - t_killed
    assert "heartbeat" in (crashed.state.message or "")

    # 3. Retry the same flow run: finished stages are skipped, distillation resumes.
    t0 = time.perf_counter()
    retry = stack.prefect("flow-run", "retry", str(run_b))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    resumed = stack.wait_for_state(run_b, TERMINAL, timeout=600)
    timings["retry → Completed"] = time.perf_counter() - t0
    assert resumed.state_type == StateType.COMPLETED, resumed.state
    assert resumed.run_count == 2
    pipeline_log = _logs(stack, run_b)
    for stage in ("ingest", "trajectories"):
        assert f"{stage}: already complete with this config; skipped" in pipeline_log
    distills = [r for r in stack.subflow_runs(run_b) if r.name.startswith("distill-")]
    assert [r.state_type for r in distills] == [StateType.CRASHED, StateType.COMPLETED]
    assert "resuming" in _logs(stack, distills[-1].id)

    lora_a, lora_b = load_file(a / LORA), load_file(b / LORA)
    assert lora_a.keys() == lora_b.keys() and lora_a
    for key in lora_a:
        assert lora_a[key].dtype == lora_b[key].dtype and lora_a[key].equal(lora_b[key]), key
    print("\nprefect e2e timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


def _rapm_on(stack, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``rapm ARGS`` as a user types it after ``source .state/prefect-stack/env`` (without the
    test suite's library quieting)."""
    env = {k: v for k, v in stack.env.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env={**env, "PYTHONPATH": str(ROOT)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def _runs_named(stack, name: str) -> list:
    with stack.client() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


@pytest.mark.slow
def test_rapm_with_a_server_configured_records_a_flow_run_with_its_artifacts(prefect_stack, tmp_path):
    src = tmp_path / "captions.txt"
    src.write_text("".join(f"a photo of object {i}\n" for i in range(8)), encoding="utf-8")
    proc = _rapm_on(prefect_stack, ["ingest", str(src), "--out", str(tmp_path / "store")], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{tmp_path / 'store'}: 8 prompts (")
    name = ingest_run_name(IngestConfig(source=str(src), out=str(tmp_path / "store")))
    runs = _runs_named(prefect_stack, name)
    assert [r.state_type for r in runs] == [StateType.COMPLETED], runs
    with prefect_stack.client() as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    assert sorted(a.type for a in artifacts) == ["markdown", "table"]
    assert "a photo of object 0" in next(a.data for a in artifacts if a.type == "markdown")


@pytest.mark.slow
def test_a_user_error_in_a_flow_run_on_a_server_is_one_line_and_a_failed_run(prefect_stack, tmp_path):
    # A finished-looking run whose run.json does not name its trajectory store: `evaluate` finds
    # that out inside its flow, which the server then records as Failed with the traceback.
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"format": 1, "config": {}, "config_hash": "c", "store_config_hash": "s"}')
    (run / "done.json").write_text('{"step": 2, "config_hash": "c", "export": "export"}')
    (run / "export").mkdir()
    (run / "export" / "inference.json").write_text("{}")
    write_manifest(run / "export", {})  # an export that verifies: the error is the run.json's, found in the flow
    proc = _rapm_on(prefect_stack, ["evaluate", "--run", str(run), "--device", "cpu"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Finished in state Failed" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rapm evaluate: error: {run}/run.json does not name its trajectory store (an older run dir); "
        f"pass --trajectories")
    with prefect_stack.client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="evaluate-run-")))
    assert StateType.FAILED in [r.state_type for r in runs]


@pytest.mark.slow
def test_a_library_warning_goes_to_the_flow_runs_log_not_to_the_terminal(prefect_stack, tiny_sd15_dir, tmp_path,
                                                                         build_tiny_run):
    # Stock load_lora_weights warns that the UNet-only LoRA has no text-encoder keys.
    _, _, run = build_tiny_run(tmp_path, tiny_sd15_dir, iterations=1)
    proc = _rapm_on(prefect_stack, ["sample", "--run", str(run), "--prompt", "a red circle", "--num-images", "1",
                                    "--out", str(tmp_path / "samples"), "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No LoRA keys" not in proc.stdout + proc.stderr, proc.stderr
    runs = _runs_named(prefect_stack, sample_run_name(SampleConfig(run=str(run), prompt=["x"], out="x")))
    assert "diffusers.loaders.lora_base: No LoRA keys associated to CLIPTextModel" in _logs(prefect_stack, runs[-1].id)
