"""Trajectory stores on object storage: a real S3-compatible server (moto's, on 127.0.0.1).

The store is written through the same code as a local one, interrupted and resumed, and must
equal the local store bit for bit; a consumer with nothing but zarr and s3fs can read it.
Locations that need atomic renames (run dirs) are refused with a clear message.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import zarr

from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from storage.errors import StoreError
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store
from storage.run_dir import RunDir
from storage.trajectory_inspect import inspect_store
from storage.trajectory_store import TrajectoryStore
from storage.urls import exists, is_url, join, publish_dir, read_text, require_local

PROMPTS = ["a red circle", "a small blue square at the top", "green triangle", "a large yellow star"]


class Interrupted(Exception):
    """Stands in for a kill: raised from the progress callback after the first batch."""


def _config(tmp_path, teacher, out: str) -> TrajectoriesConfig:
    prompts = tmp_path / "prompts"
    if not prompts.exists():
        write_prompt_store(prompts, [PromptRecord(prompt_id(t), t, "train") for t in PROMPTS])
    return TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher), out=out, slots=2, steps_per_slot=2,
                              guidance=7.5, seed=5, batch_size=2, device="cpu", store_dtype="float16")


def _quiet(_msg: str) -> None:
    pass


def _interrupt_after_first_batch(progress) -> None:
    raise Interrupted


def test_s3_store_resumes_and_equals_the_local_store(s3_bucket, tmp_path, tiny_sd15_dir):  # noqa: F811
    local = _config(tmp_path, tiny_sd15_dir, str(tmp_path / "local"))
    generate_trajectories(local, log=_quiet)

    url = f"{s3_bucket}/stores/{uuid.uuid4().hex[:8]}"
    remote = _config(tmp_path, tiny_sd15_dir, url)
    with pytest.raises(Interrupted):
        generate_trajectories(remote, progress=_interrupt_after_first_batch, log=_quiet)
    assert TrajectoryStore(url).complete_indices().tolist() == [0, 1]

    report = generate_trajectories(remote, log=_quiet)
    assert (report.generated, report.already_complete) == (2, 2)
    assert generate_trajectories(remote, log=_quiet).generated == 0

    # A consumer with plain zarr + s3fs, endpoint and keys passed explicitly (no rapm code).
    options = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"}
    theirs = zarr.open_group(url, mode="r", storage_options=options)
    ours = zarr.open_group(local.out, mode="r")
    assert sorted(theirs.array_keys()) == sorted(ours.array_keys())
    for name in ours.array_keys():
        assert np.array_equal(theirs[name][:], ours[name][:]), name
    assert theirs.attrs["config_hash"] == ours.attrs["config_hash"] == TrajectoryStore(url).schema.config_hash

    summary = inspect_store(url)
    assert (summary["complete"], summary["total"]) == (4, 4) and summary["bytes_on_disk"] > 0


def test_run_dir_on_object_storage_is_refused(s3_bucket):  # noqa: F811
    with pytest.raises(StoreError, match="atomic renames"):
        RunDir(f"{s3_bucket}/runs/r1")


def test_url_helpers(s3_bucket, tmp_path):  # noqa: F811
    assert is_url("s3://b/x") and is_url("memory://x") and not is_url("runs/x") and not is_url("file:///tmp/x")
    assert join("s3://b/reports/", "eval", "report.md") == "s3://b/reports/eval/report.md"
    assert require_local("file:///tmp/x", "a run dir").as_posix() == "/tmp/x"

    report = tmp_path / "eval"
    (report / "images").mkdir(parents=True)
    (report / "images" / "0.png").write_bytes(b"png")
    (report / "report.md").write_text("# report\n")
    (report / "metrics.json").write_text("{}\n")
    target = f"{s3_bucket}/reports/{uuid.uuid4().hex[:8]}"
    uploaded = publish_dir(report, target, last=("metrics.json", "report.md"))
    assert uploaded[-2:] == [join(target, "metrics.json"), join(target, "report.md")]
    assert exists(join(target, "images/0.png")) and read_text(join(target, "report.md")) == "# report\n"


def test_distill_and_evaluate_from_an_s3_store_publish_the_report_to_s3(s3_bucket, tmp_path, tiny_sd15_dir):  # noqa: F811
    """The stages after Stage A read the store from S3; the report lands on S3 as well."""
    from rapm_core.distill.config import DistillRunConfig
    from rapm_core.distill.run import run_distillation
    from rapm_core.evaluate.config import EvaluateConfig
    from rapm_core.evaluate.run import evaluate_run

    url = f"{s3_bucket}/stores/{uuid.uuid4().hex[:8]}"
    generate_trajectories(_config(tmp_path, tiny_sd15_dir, url), log=_quiet)
    run = tmp_path / "run"
    run_distillation(DistillRunConfig(trajectories=url, out=str(run), iterations=2, checkpoint_every=2, device="cpu",
                                      adversarial={"disc_channels": 8}), log=_quiet)

    target = f"{s3_bucket}/reports/{uuid.uuid4().hex[:8]}"
    eval_prompts = tmp_path / "eval-prompts"
    write_prompt_store(eval_prompts, [PromptRecord(prompt_id(t), t, "eval") for t in PROMPTS[:2]])
    logs: list[str] = []
    config = EvaluateConfig(run=str(run), trajectories=url, prompts=str(eval_prompts), num_images=2,
                            batch_size=2, device="cpu", evaluator="none", samplers=["student"], trajectory_rows=1,
                            grid_rows=2, publish=target)
    result = evaluate_run(config, log=logs.append)
    local = tmp_path / "run" / "eval"
    for name in ("metrics.json", "report.md", "grid.png"):
        assert exists(join(target, name)), name
    assert read_text(join(target, "metrics.json")) == (local / "metrics.json").read_text()
    assert result.rows and not result.skipped

    again = evaluate_run(config, log=logs.append)
    assert again.skipped and logs[-1].endswith("this report is already published")
