"""PCM as published: its adversarial run's discriminator settings by default (options given win,
run.json records what ran), its discriminator layout as an option, and the README's commands that
run each peer at its script's own settings."""

import json
import re
from pathlib import Path

import pytest
import torch

from rapm_core.conditioning import Conditioning
from flows.cli import build_parser
from flows.cli_model import model_from_args
from rapm_core.distill.config import PCM_PUBLISHED_ADVERSARIAL, AdversarialConfig, DistillRunConfig, MethodConfig
from rapm_core.distill.discriminator import FeatureTaps, HeadSet
from rapm_core.distill.method import GuidedTeacher
from rapm_core.distill.run import run_distillation
from rapm_core.distill.student import attach_lora, lora_config
from rapm_core.distill.trainer import Trainer
from rapm_testing.helpers import (LATENT, grid_for, load_unet, method_config, random_cond, scheduler_config,
                                  teacher_trajectory)

ROOT = Path(__file__).resolve().parents[1]


def readme_distill_commands() -> list[list[str]]:
    """The `rapm distill --method …` lines of the README's UNet sections (the flow teacher's section
    has its own), as argv lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Rectified-flow teachers", 1)[0]
    return [line.split()[1:] for line in (ln.strip() for ln in text.splitlines())
            if re.match(r"rapm distill .*--method (pcm|lcm)", line)]


def _config(argv: list[str]) -> DistillRunConfig:
    return model_from_args(DistillRunConfig, build_parser().parse_args(argv))


def test_the_readme_runs_pcm_as_published_and_run_json_records_it(tmp_path, tiny_sd15_dir, make_store):
    commands = {argv[argv.index("--method") + 1]: argv for argv in readme_distill_commands()}
    assert set(commands) == {"pcm", "lcm"}
    lcm = _config(commands["lcm"])
    assert lcm.peer.teacher_guidance == (6.0, 16.0)  # LCM's script: w ~ U[5, 15], CFG scale 1 + w
    assert lcm.adversarial == AdversarialConfig()  # not PCM's adversarial run: our defaults stand

    store = make_store(tmp_path, tiny_sd15_dir, num=1)
    argv = list(commands["pcm"])
    argv[argv.index("--trajectories") + 1], argv[argv.index("--out") + 1] = str(store), str(tmp_path / "run")
    config = _config(argv + ["--iterations", "2", "--disc-channels", "8", "--device", "cpu"])
    assert config.peer.teacher_guidance == (5.0, 6.0)  # PCM's script: w ~ U[4, 5]
    run_distillation(config, log=lambda _: None)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]["adversarial"]
    assert {k: recorded[k] for k in PCM_PUBLISHED_ADVERSARIAL} == {
        "lambda_adv": 0.1, "lr_disc": 1e-5, "disc_betas": [0.0, 0.999], "disc_schedule": "alternate"}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["grad_norm" in m for m in metrics] == [False, True]  # D first, then G: alternating


def test_options_given_win_over_pcms_published_ones():
    base = ["distill", "--trajectories", "S", "--out", "R", "--method", "pcm", "--pcm-adversarial"]
    given = _config(base + ["--lambda-adv", "1.0", "--disc-schedule", "simultaneous"]).adversarial
    assert (given.lambda_adv, given.disc_schedule) == (1.0, "simultaneous")
    assert (given.lr_disc, given.disc_betas) == (1e-5, (0.0, 0.999))
    assert _config(base[:-1]).adversarial == AdversarialConfig()  # plain PCM: no discriminator, no change
    assert MethodConfig(method="rapm").adversarial == AdversarialConfig()
    # a recorded config (every option explicit) reads back as it was written
    recorded = MethodConfig.from_options(method="pcm", pcm_adversarial=True)
    assert MethodConfig.model_validate(recorded.model_dump(mode="json")) == recorded
    assert MethodConfig.model_validate(
        {**recorded.model_dump(mode="json"), "adversarial": AdversarialConfig().model_dump()}).adversarial == \
        AdversarialConfig()


def test_pcms_layout_reads_the_up_blocks_with_four_heads_per_map(tiny_sd15_dir):
    reference, unet = load_unet(tiny_sd15_dir), load_unet(tiny_sd15_dir)
    attach_lora(unet, lora_config(1))
    cond, x = random_cond(unet), torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    feats = []
    blocks = [*reference.down_blocks, reference.mid_block, *reference.up_blocks]
    for b in blocks:
        b.register_forward_hook(lambda m, i, o: feats.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        reference(x, 400, **cond.unet_kwargs())
        taps = FeatureTaps(unet, up_blocks=True)
        ours = taps(x, 400, cond)
    assert len(ours) == len(blocks) == len(taps.channels)
    assert all(torch.equal(a, b) and a.shape[1] == c for a, b, c in zip(ours, feats, taps.channels))
    heads = HeadSet(taps.channels, 8, per_map=4)
    assert len(heads(ours)) == 4 * len(blocks) == len(heads.heads)
    assert [h.block1[0].in_channels for h in heads.heads] == [c for c in taps.channels for _ in range(4)]


@pytest.mark.parametrize("method", ["pcm", "rapm"])
def test_either_method_trains_heads_of_pcms_layout(method, tiny_sd15_dir):
    grid = grid_for(tiny_sd15_dir, 2, 2)
    example = teacher_trajectory(tiny_sd15_dir, grid)
    example.x0 = example.positions[-1:]  # the peers' clean latents: the store's own final position
    options = {"method": "pcm", "pcm_adversarial": True, "disc_schedule": "simultaneous"} if method == "pcm" else {}
    teacher = GuidedTeacher(Conditioning(torch.zeros_like(example.cond.prompt_embeds)), guidance=3.0)
    trainer = Trainer(load_unet(tiny_sd15_dir), scheduler_config(tiny_sd15_dir), grid,
                      method_config(disc_layout="pcm", **options), teacher=teacher)
    before = trainer.trainable_state_dict()
    trainer.train_step(example, torch.Generator().manual_seed(0))
    after = trainer.trainable_state_dict()
    head_keys = [k for k in after if k.startswith("disc_")]
    assert len({k.split(".")[2] for k in head_keys}) == 4 * 5  # the tiny UNet's 2 down, mid, 2 up; 4 heads each
    assert any(not torch.equal(after[k], before[k]) for k in head_keys)
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)
