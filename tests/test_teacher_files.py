"""A local teacher with a component missing or broken is refused in one line naming it, before
diffusers reads it (no OverflowError from a pipeline loaded without its tokenizer, no missing
``.bin`` for missing safetensors, no "offline?" for a local directory)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from rapm_core.errors import ConfigError
from rapm_core.teacher import encode_uncond, load_teacher, load_unet, load_vae
from rapm_testing.helpers import rapm_env, run_rapm
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

CASES = [
    # what to remove ("path") or break ("path:broken"), what the message must say
    ("tokenizer", "its tokenizer/ folder (CLIPTokenizer, listed in model_index.json) is missing"),
    ("text_encoder", "its text_encoder/ folder (CLIPTextModel"),
    ("unet", "its unet/ folder (UNet2DConditionModel"),
    ("vae", "its vae/ folder (AutoencoderKL"),
    ("scheduler", "its scheduler/ folder (DDIMScheduler"),
    ("model_index.json", "is not a diffusers pipeline directory: model_index.json is missing"),
    ("model_index.json:broken", "model_index.json is not readable JSON"),
    ("unet/diffusion_pytorch_model.safetensors", "unet/ (UNet2DConditionModel) has no weights "
                                                 "(diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin)"),
    ("vae/diffusion_pytorch_model.safetensors", "vae/ (AutoencoderKL) has no weights"),
    ("text_encoder/model.safetensors", "text_encoder/ (CLIPTextModel) has no weights (model.safetensors"),
    ("tokenizer/tokenizer.json", "tokenizer/ (CLIPTokenizer) has no tokenizer files"),
    ("tokenizer/tokenizer.json:broken", "tokenizer/ (CLIPTokenizer): tokenizer.json is not readable JSON"),
    ("unet/config.json", "unet/ (UNet2DConditionModel): config.json is missing"),
    ("unet/config.json:broken", "unet/ (UNet2DConditionModel): config.json is not readable JSON"),
    ("scheduler/scheduler_config.json", "scheduler/ (DDIMScheduler): scheduler_config.json is missing"),
    ("unet/diffusion_pytorch_model.safetensors:broken", "unet/diffusion_pytorch_model.safetensors"),
]


def damaged(teacher, tmp_path, case: str):
    path, _, how = case.partition(":")
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    target = copy / path
    if how == "broken":
        target.write_bytes(b"{truncated")
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return copy


@pytest.mark.parametrize("case,problem", CASES, ids=[c[0] for c in CASES])
def test_a_missing_or_broken_component_is_named(tiny_sd15_dir, tmp_path, capfd, case, problem):
    teacher = damaged(tiny_sd15_dir, tmp_path, case)
    with pytest.raises(ConfigError) as err:
        encode_uncond(load_teacher(teacher))
    message = str(err.value)
    assert str(teacher) in message and problem in message and "\n" not in message, message
    assert "offline" not in message, "a local directory has nothing to do with the hub"
    assert "unsafe serialization" not in capfd.readouterr().err


def test_unet_and_vae_loads_check_only_their_own_component(tiny_sd15_dir, tmp_path):
    teacher = damaged(tiny_sd15_dir, tmp_path, "tokenizer")
    load_unet(teacher), load_vae(teacher)  # Stage B and the decodes never read the tokenizer
    shutil.rmtree(teacher / "unet")
    with pytest.raises(ConfigError, match="its unet/ folder"):
        load_unet(teacher)


def test_a_teacher_with_bin_weights_still_loads(tiny_sd15_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd15_dir, teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    unet = load_unet(teacher)
    assert unet.conv_in.weight.shape[0] > 0


def test_rapm_trajectories_with_a_teacher_without_tokenizer_is_one_line(tiny_sd15_dir, tmp_path):
    teacher = damaged(tiny_sd15_dir, tmp_path, "tokenizer")
    store = write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id("a red circle"), "a red circle")])
    code, _out, err = run_rapm(["trajectories", "--prompts", str(store), "--teacher", str(teacher),
                                "--out", str(tmp_path / "traj.zarr"), "--slots", "2", "--steps-per-slot", "2",
                                "--device", "cpu"], rapm_env(tmp_path / "prefect"), tmp_path / "logs")
    assert code == 2 and err == (f"rapm trajectories: error: teacher '{teacher}': its tokenizer/ folder "
                                 f"(CLIPTokenizer, listed in model_index.json) is missing\n"), err
    assert not (tmp_path / "traj.zarr").exists()


def test_fp16_on_the_cpu_is_refused_before_the_teacher_loads(tiny_sd15_dir, tmp_path):
    store = write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id("a red circle"), "a red circle")])
    code, out, err = run_rapm(["trajectories", "--prompts", str(store), "--teacher", str(tiny_sd15_dir),
                               "--out", str(tmp_path / "traj.zarr"), "--dtype", "fp16", "--device", "cpu"],
                              rapm_env(tmp_path / "prefect"), tmp_path / "logs")
    assert code == 2 and err.startswith("rapm trajectories: error: --dtype fp16 on the CPU") and err.count("\n") == 1
    assert "cannot run with cpu" not in out + err and not (tmp_path / "traj.zarr").exists()


def test_rapm_trajectories_prints_no_library_progress_bars(tiny_sd15_dir, tmp_path):
    store = write_prompt_store(tmp_path / "prompts", [PromptRecord(prompt_id("a red circle"), "a red circle")])
    env = rapm_env(tmp_path / "prefect")
    env.pop("TRANSFORMERS_VERBOSITY")  # as a user's shell has it
    code, out, err = run_rapm(["trajectories", "--prompts", str(store), "--teacher", str(tiny_sd15_dir),
                               "--out", str(tmp_path / "traj.zarr"), "--slots", "2", "--steps-per-slot", "2",
                               "--device", "cpu"], env, tmp_path / "logs")
    assert code == 0, err[-2000:]
    for noise in ("Loading pipeline components", "Loading weights"):
        assert noise not in out + err, noise
