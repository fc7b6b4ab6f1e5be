"""A run killed with SIGKILL at arbitrary moments and restarted ends bit-identical to one never
stopped: weights, optimizer-driven trajectory and metrics alike (CPU, same seed); and a trajectory
store killed while it is being filled ends bit-identical to one generated in one go.

The killed runs are separate processes running the plain training function (a Prefect server
start per process would dominate the test); kill points are found by watching the run dir from
outside, so the product code has no test hooks.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rapm_core.distill.run import TIMING_FIELDS, run_distillation
from rapm_testing.helpers import run_config

TESTS = Path(__file__).parent
CHILD = (
    "import sys, torch; torch.set_num_threads(1); "
    "from rapm_core.distill.config import DistillRunConfig; from rapm_core.distill.run import run_distillation; "
    "run_distillation(DistillRunConfig.model_validate_json(sys.argv[1]))"
)
TRAJECTORY_CHILD = (
    "import sys, torch; torch.set_num_threads(1); "
    "from rapm_core.trajectories.config import TrajectoriesConfig; "
    "from rapm_core.trajectories.generate import generate_trajectories; "
    "generate_trajectories(TrajectoriesConfig.model_validate_json(sys.argv[1]))"
)


def _start(config, log: Path, child: str = CHILD) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", child, config.model_dump_json()], cwd=TESTS.parent, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child made no progress in time")
        time.sleep(0.005)
    return False


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


# Every method through the same trainer: RAPM with both loss kinds, PCM with its discriminator on
# the alternating schedule, LCM-LoRA; the kill points are drawn from a seed per case.
METHODS = {
    "rapm": ({}, True),
    "pcm-adversarial": ({"method": "pcm", "pcm_adversarial": True, "disc_schedule": "alternate"}, True),
    "lcm": ({"method": "lcm"}, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case,seed", [("rapm", 0), ("pcm-adversarial", 1), ("lcm", 2)])
def test_sigkilled_and_resumed_run_equals_uninterrupted(tmp_path, tiny_sd15_dir, case, seed, make_store):
    method, has_heads = METHODS[case]
    store = make_store(tmp_path, tiny_sd15_dir)
    reference = run_config(store, tmp_path / "reference", method=method)
    run_distillation(reference, log=lambda _: None)

    run = tmp_path / "killed"
    config = reference.model_copy(update={"out": str(run)})
    ckpts = run / "checkpoints"
    rng = random.Random(seed)
    target, delay = rng.randint(3, config.iterations - 1), rng.uniform(0.0, 1.5)

    def after_line(target: int, delay: float, started: float):
        """Once this child has written line ``target`` (not a killed one's stale line), wait ``delay``."""
        seen = []

        def ready() -> bool:
            path = run / "metrics.jsonl"
            if not seen and path.exists() and path.stat().st_mtime > started and _lines(run) >= target:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay
        return ready

    kill_points = [
        ("the first checkpoint exists", lambda started: lambda: any(ckpts.glob("step-*"))),
        ("a checkpoint is being written", lambda started: lambda: any(ckpts.glob(".tmp-step-*"))),
        (f"{delay:.2f} s after line {target}", lambda started: after_line(target, delay, started)),
    ]
    killed = []
    for n, (name, make_ready) in enumerate(kill_points):
        started = time.time()
        proc = _start(config, tmp_path / f"child-{n}.log")
        if _kill_when(proc, make_ready(started)):
            killed.append(name)
        else:
            assert proc.returncode == 0, (tmp_path / f"child-{n}.log").read_text()
    print("killed when:", "; ".join(killed))
    assert killed[0] == "the first checkpoint exists"
    final = _start(config, tmp_path / "final.log")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()

    last = f"step-{config.iterations:07d}"
    want = load_file(tmp_path / "reference" / "checkpoints" / last / "trainable.safetensors")
    got = load_file(ckpts / last / "trainable.safetensors")
    assert want.keys() == got.keys() and any("lora" in k for k in got)
    assert any(k.startswith("disc_") for k in got) == has_heads
    assert all(torch.equal(want[k], got[k]) for k in want), f"kills at {killed}: weights differ"
    lora_b = [v for k, v in got.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # training really moved the adapter off its zero init
    exported = (load_file(tmp_path / "reference" / "export" / "pytorch_lora_weights.safetensors"),
                load_file(run / "export" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    assert _metrics(run) == _metrics(tmp_path / "reference")
    assert len(_metrics(run)) == config.iterations
    assert not list(ckpts.glob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_sigkilled_trajectory_store_resumes_bit_identically(tmp_path, tiny_sd15_dir, seed):
    """Killed at a random point of the filling (mid-batch, mid-write, between batches), twice."""
    import numpy as np
    import zarr

    from rapm_core.trajectories.config import TrajectoriesConfig
    from rapm_core.trajectories.generate import generate_trajectories
    from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store
    from storage.trajectory_store import TrajectoryStore

    texts = [f"a {size} {c} {s}" for size in ("small", "large") for c in ("red", "green", "blue")
             for s in ("circle", "square", "triangle", "star")]
    write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id(t), t) for t in texts])
    whole = TrajectoriesConfig(prompts=str(tmp_path / "prompts"), teacher=str(tiny_sd15_dir),
                               out=str(tmp_path / "whole.zarr"), slots=2, steps_per_slot=10, guidance=3.0,
                               device="cpu", batch_size=2)
    generate_trajectories(whole, log=lambda _: None)
    killed = whole.model_copy(update={"out": str(tmp_path / "killed.zarr")})
    rng = random.Random(seed)

    def complete() -> int:
        try:
            return len(TrajectoryStore(killed.out).complete_indices())
        except Exception:  # not created yet, or being created
            return 0

    kills = []
    for n, target in enumerate(sorted(rng.sample(range(1, len(texts) - 1), 2))):
        delay = rng.uniform(0.0, 0.3)
        seen = []

        def ready(target=target, delay=delay, seen=seen) -> bool:
            if not seen and complete() >= target:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay
        proc = _start(killed, tmp_path / f"child-{n}.log", TRAJECTORY_CHILD)
        if _kill_when(proc, ready):
            kills.append((target, round(delay, 2), complete()))
    assert any(done < len(texts) for *_, done in kills), f"no kill left work undone: {kills}"
    generate_trajectories(killed, log=lambda _: None)
    a, b = zarr.open_group(whole.out, mode="r"), zarr.open_group(killed.out, mode="r")
    for name in ("positions", "prompt_embeds", "seed", "complete", "prompt"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=f"{name} after kills at {kills}")
