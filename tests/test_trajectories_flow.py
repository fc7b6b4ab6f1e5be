"""Stage A end to end on tiny teachers: stored trajectories equal stock diffusers, resume is
bit-identical, mismatched stores are refused, and the CLI runs a real flow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

from flows.cli import main as rapm_main
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories, preflight
from rapm_testing.helpers import perturb_unet_weights
from storage.errors import ConfigMismatchError
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store
from storage.teacher_fingerprint import teacher_fingerprint
from storage.trajectory_schema import StoreSchema
from storage.trajectory_store import TrajectoryStore

PROMPTS = ["a red circle", "a small blue square at the top", "green triangle", "a large yellow star on the left side"]


def _prompt_store(path: Path, texts=PROMPTS) -> str:
    write_prompt_store(path, [PromptRecord(prompt_id(t), t, "train") for t in texts])
    return str(path)


def _config(tmp_path, teacher, out="store", **kw) -> TrajectoriesConfig:
    prompts = tmp_path / "prompts"
    if not prompts.exists():
        _prompt_store(prompts)
    base = dict(prompts=str(prompts), teacher=str(teacher), out=str(tmp_path / out), slots=2, steps_per_slot=3,
                guidance=7.5, seed=3, batch_size=2, device="cpu", store_dtype="float32")
    return TrajectoriesConfig(**{**base, **kw})


def _quiet(_msg: str) -> None:
    pass


def _stock_positions(pipe, prompts, z0, steps, guidance):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               clip_sample=False, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    captured = []

    def keep(_pipe, _i, _t, kw):
        captured.append(kw["latents"].clone())
        return kw

    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=z0.clone(), output_type="latent",
         callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    return torch.stack([z0, *captured], dim=1)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_stored_trajectories_equal_stock_pipeline(kind, tmp_path, tiny_sd15_dir, tiny_sdxl_dir):
    teacher_dir = tiny_sd15_dir if kind == "sd15" else tiny_sdxl_dir
    config = _config(tmp_path, teacher_dir, limit=3)
    report = generate_trajectories(config, log=_quiet)
    assert report.generated == 3

    store = TrajectoryStore(config.out)
    assert store.schema.kind == kind and store.complete_indices().tolist() == [0, 1, 2]
    records = [store.read(i) for i in range(3)]
    stored = torch.from_numpy(np.stack([r.positions for r in records]))
    assert stored.shape == (3, 2 * 3 + 1, 4, 16, 16) and stored.dtype == torch.float32

    # The stored initial noise is what a stock pipeline draws from one CPU generator per trajectory.
    seeds = [r.seed for r in records]
    noise = randn_tensor((3, 4, 16, 16), generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(stored[:, 0], noise)

    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {}
    pipe = cls.from_pretrained(teacher_dir, **extra)
    ref = _stock_positions(pipe, [r.prompt for r in records], stored[:, 0], 6, 7.5)
    assert (stored - ref).abs().max().item() <= 1e-4
    assert (stored[:, -1] - stored[:, 0]).abs().max() > 0.1  # it really moved

    # Stored conditioning is what the stock pipeline encodes (same batch as generation: [0, 2)).
    batch = [records[0].prompt, records[1].prompt]
    with torch.no_grad():
        if kind == "sd15":
            embeds, _ = pipe.encode_prompt(batch, "cpu", 1, False)
            pooled = None
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(batch, device="cpu", do_classifier_free_guidance=False)
    assert np.array_equal(records[1].conditioning["prompt_embeds"], embeds[1].numpy())
    if kind == "sd15":
        assert records[1].conditioning["pooled_prompt_embeds"] is None and records[1].conditioning["time_ids"] is None
    else:
        assert np.array_equal(records[1].conditioning["pooled_prompt_embeds"], pooled[1].numpy())
        assert records[1].conditioning["time_ids"].tolist() == [32, 32, 0, 0, 32, 32]


class _Interrupt(RuntimeError):
    pass


def test_resume_after_interruption_is_bit_identical(tmp_path, tiny_sd15_dir):
    whole = _config(tmp_path, tiny_sd15_dir, out="whole", store_dtype="float16")
    generate_trajectories(whole, log=_quiet)

    parted = _config(tmp_path, tiny_sd15_dir, out="parted", store_dtype="float16")

    def stop_after_first_batch(progress):
        raise _Interrupt(f"interrupted after {progress.done}")

    with pytest.raises(_Interrupt):
        generate_trajectories(parted, progress=stop_after_first_batch, log=_quiet)
    # The batch submitted before the interruption was flushed; the rest is missing.
    assert TrajectoryStore(parted.out).complete_indices().tolist() == [0, 1]

    report = generate_trajectories(parted, log=_quiet)
    assert (report.generated, report.already_complete) == (2, 2)

    a, b = zarr.open_group(whole.out, mode="r"), zarr.open_group(parted.out, mode="r")
    for name in ("positions", "prompt_embeds", "seed", "complete"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a["positions"].dtype == np.float16

    again = generate_trajectories(parted, log=_quiet)
    assert (again.generated, again.already_complete) == (0, 4)


def test_shards_fill_one_store_like_a_single_run(tmp_path, tiny_sd15_dir):
    single = _config(tmp_path, tiny_sd15_dir, out="single", steps_per_slot=2)
    generate_trajectories(single, log=_quiet)
    sharded = _config(tmp_path, tiny_sd15_dir, out="sharded", steps_per_slot=2)
    generate_trajectories(sharded, start=2, stop=4, log=_quiet)
    assert TrajectoryStore(sharded.out).complete_indices().tolist() == [2, 3]
    generate_trajectories(sharded, start=0, stop=2, log=_quiet)
    np.testing.assert_array_equal(zarr.open_group(single.out)["positions"][:],
                                  zarr.open_group(sharded.out)["positions"][:])


def test_samples_per_prompt_extends_a_one_sample_store_with_new_noise(tmp_path, tiny_sd15_dir):
    one = _config(tmp_path, tiny_sd15_dir, out="one", steps_per_slot=2, limit=2)
    generate_trajectories(one, log=_quiet)
    three = one.model_copy(update={"out": str(tmp_path / "three"), "samples_per_prompt": 3})
    assert generate_trajectories(three, log=_quiet).generated == 6

    a, b = TrajectoryStore(one.out), TrajectoryStore(three.out)
    rows = [b.read(i) for i in range(6)]
    assert [r.prompt for r in rows] == PROMPTS[:2] * 3
    assert len({r.seed for r in rows}) == 6
    # Round 0 is the one-sample store, bit for bit; later rounds are the same prompts, other noise.
    for i in range(2):
        np.testing.assert_array_equal(a.read(i).positions, rows[i].positions)
        np.testing.assert_array_equal(rows[i].conditioning["prompt_embeds"], rows[i + 2].conditioning["prompt_embeds"])
        assert not np.array_equal(rows[i].positions[0], rows[i + 2].positions[0])
    assert b.schema.prompt_store.samples_per_prompt == 3
    with pytest.raises(ConfigMismatchError):
        generate_trajectories(three.model_copy(update={"samples_per_prompt": 2}), log=_quiet)


def test_mismatched_store_is_refused(tmp_path, tiny_sd15_dir):
    config = _config(tmp_path, tiny_sd15_dir, steps_per_slot=2, limit=2)
    generate_trajectories(config, log=_quiet)
    with pytest.raises(ConfigMismatchError, match=r"guidance: store has 7\.5, this run wants 5\.0"):
        generate_trajectories(config.model_copy(update={"guidance": 5.0}), log=_quiet)
    with pytest.raises(ConfigMismatchError, match=r"num_slots: store has 2, this run wants 3") as err:
        generate_trajectories(config.model_copy(update={"slots": 3}), log=_quiet)
    assert "use another --out" in str(err.value)
    with pytest.raises(ConfigMismatchError, match="prompt set differs"):
        generate_trajectories(config.model_copy(update={"limit": 3}), log=_quiet)


def test_a_store_is_not_resumed_with_other_weights_at_the_teacher_path(tmp_path, tiny_sd15_dir):
    teacher = Path(shutil.copytree(tiny_sd15_dir, tmp_path / "teacher"))
    config = _config(tmp_path, teacher, steps_per_slot=2)
    generate_trajectories(config, stop=2, log=_quiet)
    recorded = TrajectoryStore(config.out).schema.teacher_fingerprint
    assert recorded == teacher_fingerprint(teacher) == teacher_fingerprint(tiny_sd15_dir)  # content, not path

    perturb_unet_weights(teacher)
    assert teacher_fingerprint(teacher) != recorded
    with pytest.raises(ConfigMismatchError, match="is not the one that made this store"):
        generate_trajectories(config, log=_quiet)
    assert TrajectoryStore(config.out).complete_indices().tolist() == [0, 1]  # nothing written


def test_cli_reports_user_errors_in_one_line(tmp_path, tiny_sd15_dir, capsys):
    config = _config(tmp_path, tiny_sd15_dir, steps_per_slot=2, limit=1)
    generate_trajectories(config, log=_quiet)
    capsys.readouterr()
    code = rapm_main(["trajectories", "--prompts", config.prompts, "--teacher", str(tiny_sd15_dir),
                      "--out", config.out, "--slots", "2", "--steps-per-slot", "2", "--guidance", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "guidance: store has 7.5" in err
    code = rapm_main(["trajectories", "--prompts", config.prompts, "--teacher", str(tmp_path / "no-such-teacher"),
                      "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot load teacher" in err


def test_cli_runs_the_flow_in_a_subprocess(tmp_path, tiny_sdxl_dir):
    prompts = _prompt_store(tmp_path / "prompts", PROMPTS[:2])
    out = tmp_path / "store"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # no server: the command runs the flow's body itself
    rapm = Path(sys.executable).parent / "rapm"
    proc = subprocess.run(
        [str(rapm), "trajectories", "--prompts", prompts, "--teacher", str(tiny_sdxl_dir), "--out", str(out),
         "--slots", "2", "--steps-per-slot", "2", "--batch-size", "2", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2/2 trajectories complete (sdxl, N=2, M=2, w=7.5" in proc.stdout
    assert "trajectories/s, ETA" in proc.stderr + proc.stdout  # the flow's progress log line
    store = TrajectoryStore(str(out))
    assert store.complete_indices().tolist() == [0, 1] and store.schema.store_dtype == "float16"


def test_out_into_a_directory_of_other_files_is_refused_and_left_alone(tmp_path, tiny_sd15_dir, capsys):
    prompts = tmp_path / "prompts"
    write_prompt_store(prompts, [PromptRecord(prompt_id("a red circle"), "a red circle")])
    mine = tmp_path / "my-photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not a store")
    args = ["trajectories", "--prompts", str(prompts), "--teacher", str(tiny_sd15_dir), "--out", str(mine),
            "--device", "cpu"]
    assert rapm_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty and is not a trajectory store" in err and "delete" not in err
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]


def test_a_run_reads_its_store_schema_once(tmp_path, tiny_sd15_dir, monkeypatch):
    """The store is opened once and the object passed on (preflight → lock → checks → writer), not
    looked up again at each step: count how often its attributes are parsed into a schema."""
    config = _config(tmp_path, tiny_sd15_dir, steps_per_slot=2, limit=2, batch_size=1)
    generate_trajectories(config, stop=1, log=_quiet)  # a store to resume: trajectory 1 missing
    real = StoreSchema.model_validate
    parses = []
    monkeypatch.setattr(StoreSchema, "model_validate", lambda *a, **k: parses.append(a) or real(*a, **k))

    opened = preflight(config)  # what the CLI runs before the flow
    report = generate_trajectories(config, opened=opened, log=_quiet)
    assert report.generated == 1 and len(parses) == 1
    parses.clear()
    again = generate_trajectories(config, log=_quiet)  # without preflight: the engine opens it itself, once
    assert again.already_complete == 2 and len(parses) == 1


def test_the_command_opens_its_store_once(tmp_path, tiny_sd15_dir, monkeypatch, capsys):
    """`rapm trajectories` (in-process): the store its checks opened before the flow is the one the
    flow resumes and summarises: one schema parse per command, resuming or with nothing left to do."""
    config = _config(tmp_path, tiny_sd15_dir, steps_per_slot=2, limit=2, batch_size=1)
    generate_trajectories(config, stop=1, log=_quiet)  # a store to resume: trajectory 1 missing
    real = StoreSchema.model_validate
    parses = []
    monkeypatch.setattr(StoreSchema, "model_validate", lambda *a, **k: parses.append(a) or real(*a, **k))
    args = ["trajectories", "--prompts", config.prompts, "--teacher", str(tiny_sd15_dir), "--out", config.out,
            "--slots", "2", "--steps-per-slot", "2", "--guidance", "7.5", "--seed", "3", "--limit", "2",
            "--batch-size", "1", "--device", "cpu", "--store-dtype", "float32"]
    for done_before in (1, 2):
        parses.clear()
        assert rapm_main(args) == 0
        assert "2/2 trajectories complete" in capsys.readouterr().out
        assert len(parses) == 1, f"{len(parses)} schema parses with {done_before} of 2 trajectories done before"
