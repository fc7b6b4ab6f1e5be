"""SD3-class teachers in Stage A: the stored trajectories are the stock StableDiffusion3Pipeline's
positions on the store's σ grid (with T5, without it, and SD3.5's options), the store keeps the
joint and pooled embeddings, and the denoiser call and LoRA targets are the SD3 family's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer

from rapm_core.conditioning import Conditioning
from rapm_core.denoiser import SD3_LORA_TARGETS, denoise
from rapm_core.distill.student import attach_lora, lora_config
from rapm_core.flow_grid import stock_sigmas
from rapm_core.teacher import detect_kind
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_testing.tiny_sd3 import build_tiny_sd3, load_tiny_sd3
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store
from storage.trajectory_store import TrajectoryStore

PROMPTS = ["a red circle", "a small blue square at the top", "green triangle", "a large yellow star"]
T5_TOKENS = 16  # shorter than the pipeline's default 256: a small model, and the option is exercised


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": build_tiny_sd3(root / "t5", with_t5=True), "no-t5": build_tiny_sd3(root / "no-t5", with_t5=False),
            "sd35": build_tiny_sd3(root / "sd35", with_t5=False, sd35=True)}


def sd3_store(tmp_path, teacher, out="store", **kw) -> TrajectoriesConfig:
    prompts = tmp_path / "prompts"
    if not prompts.exists():
        write_prompt_store(prompts, [PromptRecord(prompt_id(t), t, "train") for t in PROMPTS])
    base = dict(prompts=str(prompts), teacher=str(teacher), out=str(tmp_path / out), slots=2, steps_per_slot=3,
                guidance=4.0, seed=3, batch_size=2, device="cpu", store_dtype="float32",
                max_sequence_length=T5_TOKENS)
    config = TrajectoriesConfig(**{**base, **kw})
    generate_trajectories(config, log=lambda _m: None)
    return config


def _stock_positions(teacher_dir, z0: torch.Tensor, config: TrajectoriesConfig) -> torch.Tensor:
    pipe = load_tiny_sd3(teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    captured = [z0.clone()]

    def keep(_pipe, _i, _t, kw):
        captured.append(kw["latents"].clone())
        return kw

    n, m = config.slots, config.steps_per_slot
    pipe(PROMPTS, latents=z0.clone(), sigmas=stock_sigmas(n, m), num_inference_steps=n * m,
         guidance_scale=config.guidance, max_sequence_length=T5_TOKENS, output_type="latent",
         callback_on_step_end=keep)
    return torch.stack(captured, dim=1)


@pytest.mark.parametrize("variant", ["t5", "no-t5", "sd35"])
def test_stored_trajectories_are_the_stock_sd3_pipelines(sd3_dirs, tmp_path, variant):
    config = sd3_store(tmp_path, sd3_dirs[variant])
    store = TrajectoryStore(config.out)
    assert store.schema.kind == "sd3" and store.schema.max_sequence_length == T5_TOKENS
    positions = torch.stack([torch.from_numpy(store.read(i).positions) for i in range(len(PROMPTS))])
    stock = _stock_positions(sd3_dirs[variant], positions[:, 0], config)
    assert stock.shape == positions.shape == (4, 7, 16, 16, 16)
    rel = ((positions - stock).abs().max() / stock.abs().max()).item()
    assert rel <= 1e-5, rel
    assert (positions[:, -1] - positions[:, 0]).abs().max() > 0.1  # the teacher moved
    # The store keeps SD3's conditioning (joint embeddings with the T5 tokens, pooled) and no time ids.
    row = store.read(0).conditioning
    assert row["time_ids"] is None and row["pooled_prompt_embeds"].shape == (32,)
    assert row["prompt_embeds"].shape[0] == 32 + T5_TOKENS  # the tiny CLIPs' 32 tokens, then the T5 ones


def test_a_t5_token_count_changes_the_store_identity(sd3_dirs, tmp_path):
    from storage.errors import ConfigMismatchError

    sd3_store(tmp_path, sd3_dirs["no-t5"], limit=1)
    with pytest.raises(ConfigMismatchError, match="max_sequence_length"):
        sd3_store(tmp_path, sd3_dirs["no-t5"], limit=1, max_sequence_length=8)


def test_the_denoiser_call_is_the_pipelines_and_lora_reaches_every_joint_projection(sd3_dirs):
    pipe = load_tiny_sd3(sd3_dirs["t5"])
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_TOKENS)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = denoise(pipe.transformer, x, torch.tensor(750.0), Conditioning(embeds, pooled))
        stock = pipe.transformer(hidden_states=x, timestep=torch.tensor([750.0, 750.0]), encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)[0]
    assert torch.equal(ours, stock)
    transformer: SD3Transformer2DModel = pipe.transformer
    attach_lora(transformer, lora_config(1, target_modules=SD3_LORA_TARGETS))
    adapted = {name.split("attn.", 1)[1] for name, m in transformer.named_modules()
               if isinstance(m, BaseTunerLayer) and "attn." in name}
    assert adapted == {t.removeprefix("attn.") for t in SD3_LORA_TARGETS}
    # Both joint blocks, both streams (the last block has no context output projection).
    assert sum(isinstance(m, BaseTunerLayer) for m in transformer.modules()) == 2 * 8 - 1


def test_detect_kind_accepts_sd3(sd3_dirs):
    assert detect_kind(str(sd3_dirs["no-t5"]))[0] == "sd3"


def test_store_inspect_json_gives_a_flow_stores_stock_sigmas(sd3_dirs, tmp_path):
    config = sd3_store(tmp_path, sd3_dirs["no-t5"], limit=1)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "store", "inspect", config.out, "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["stock_sigmas"] == stock_sigmas(2, 3) == [(6 - k) / 6 for k in range(6)]
