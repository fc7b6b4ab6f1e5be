"""RAPM and PCM on an SD3-class teacher end to end: ``rapm distill`` trains the transformer's LoRA
from a tiny SD3 store, exports it for the stock pipeline and resumes bit-identically after
SIGKILL; what is not built for transformers yet is refused in one line; the export loads into a
stock StableDiffusion3Pipeline with every key matched and samples what the project's student
sampler samples, with the model card's own call."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from rapm_core.denoiser import denoise
from rapm_core.distill.method import Example
from rapm_core.distill.run import run_distillation
from rapm_core.distill.trainer import Trainer
from rapm_core.ode import SlotGrid
from rapm_core.flow_grid import pre_shift_sigmas
from rapm_core.sampler import ode_sample
from rapm_core.teacher import encode_prompts, load_teacher, load_unet
from rapm_testing.helpers import method_config, run_config
from rapm_testing.tiny_sd3 import TEST_T5_TOKENS, load_tiny_sd3
from test_exact_resume import _kill_when, _start

T5_TOKENS = TEST_T5_TOKENS
POINTWISE = {"loss_relative": "pointwise", "loss_absolute": "pointwise"}
# Adversarial and pointwise terms: the resume restores both head sets and their optimizer too.
BOTH_LOSSES = {"loss_relative": "both", "loss_absolute": "both"}


@pytest.fixture(scope="module")
def sd3_teacher(tiny_sd3_dir):
    return tiny_sd3_dir


@pytest.fixture(scope="module")
def sd3_store(sd3_teacher, tmp_path_factory, make_store):
    return make_store(tmp_path_factory.mktemp("sd3-store"), sd3_teacher, max_sequence_length=T5_TOKENS)


def _rapm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300)


def _readme_pcm_command(store: Path, out: Path) -> list[str]:
    """The README's PCM line on the flow teacher's store, pointed at ``store`` and ``out``."""
    (argv,) = readme_flow_commands(1)
    argv = argv[1:]
    argv[argv.index("--trajectories") + 1], argv[argv.index("--out") + 1] = str(store), str(out)
    return argv


@pytest.mark.parametrize("method", [BOTH_LOSSES, {"method": "pcm"}], ids=["rapm", "pcm"])
def test_distill_trains_the_transformer_lora_exports_and_resumes_after_sigkill(sd3_teacher, sd3_store, tmp_path,
                                                                               method):
    out = tmp_path / "cli-run"
    command = (_readme_pcm_command(sd3_store, out) if method.get("method") == "pcm" else
               ["distill", "--trajectories", str(sd3_store), "--out", str(out), "--loss-relative", "both",
                "--loss-absolute", "both", "--disc-channels", "8"])
    done = _rapm(*command, "--iterations", "2", "--checkpoint-every", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    exported = load_file(out / "export" / "pytorch_lora_weights.safetensors")
    assert exported and all(k.startswith("transformer.transformer_blocks.") for k in exported)
    pipe = load_tiny_sd3(sd3_teacher)
    pipe.load_lora_weights(str(out / "export"))
    (name,) = pipe.get_active_adapters()
    assert len(get_peft_model_state_dict(pipe.transformer, adapter_name=name)) == len(exported)  # every key loaded

    reference = run_config(sd3_store, tmp_path / "reference", method=method, iterations=6)
    run_distillation(reference, log=lambda _: None)
    config = reference.model_copy(update={"out": str(tmp_path / "killed")})
    ckpts = tmp_path / "killed" / "checkpoints"
    assert _kill_when(_start(config, tmp_path / "child.log"), lambda: any(ckpts.glob("step-*")))
    assert _start(config, tmp_path / "final.log").wait(timeout=300) == 0, (tmp_path / "final.log").read_text()
    last = f"step-{config.iterations:07d}/trainable.safetensors"
    want, got = load_file(tmp_path / "reference" / "checkpoints" / last), load_file(ckpts / last)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # training moved the adapter
    if method is BOTH_LOSSES:  # the discriminator heads resumed exactly too
        assert {k.split(".")[0] for k in got if k.startswith("disc_")} == {"disc_rel", "disc_abs"}


@pytest.mark.parametrize("options,says", [
    (["--loss-relative", "adversarial", "--disc-layout", "pcm"], "an SD3-class teacher has none"),
    (["--method", "lcm"], "--method lcm on an SD3-class"),
    (["--method", "pcm", "--pcm-adversarial", "--disc-layout", "pcm"], "an SD3-class teacher has none"),
])
def test_what_is_not_built_for_transformers_is_refused_in_one_line(sd3_store, tmp_path, options, says):
    out = tmp_path / "run"
    refused = _rapm("distill", "--trajectories", str(sd3_store), "--out", str(out), "--iterations", "1",
                    "--device", "cpu", *options)
    assert refused.returncode == 2 and says in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_adversarial_rapm_reads_every_joint_block_of_the_transformer(sd3_teacher):
    """The discriminator's features are the joint blocks' image streams on the patch grid (what
    the blocks return, read by hooks), gradients reach the sample through them, and an adversarial
    RAPM step on the transformer trains both head sets."""
    pipe = load_tiny_sd3(sd3_teacher)
    grid = SlotGrid.from_scheduler(pipe.scheduler.config, 2, 2)
    trainer = Trainer(load_unet(sd3_teacher, kind="sd3"), pipe.scheduler.config, grid,
                      method_config(loss_relative="both", loss_absolute="adversarial", disc_channels=8))
    transformer = trainer.unet
    cond = encode_prompts(load_teacher(sd3_teacher, max_sequence_length=T5_TOKENS), ["a red circle"])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    taps = trainer.method.discriminators.taps
    features = taps(x, torch.tensor(600.0), cond)
    assert [tuple(f.shape) for f in features] == [(1, 16, 8, 8)] * len(transformer.transformer_blocks)
    streams = []
    hook = transformer.transformer_blocks[0].register_forward_hook(lambda _m, _i, out: streams.append(out[1]))
    with torch.no_grad():
        denoise(transformer, x, torch.tensor(600.0), cond)
    hook.remove()
    torch.testing.assert_close(features[0].flatten(2).transpose(1, 2), streams[0], rtol=0, atol=0)
    sum(f.square().mean() for f in features).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    positions = ode_sample(transformer, grid.ode, torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1)),
                           cond, grid.total_steps, return_positions=True)[0]
    metrics = trainer.train_step(Example(positions=positions, cond=cond, index=0), torch.Generator().manual_seed(0), 1)
    assert {"rel_adv", "abs_adv", "d_loss_rel", "d_loss_abs"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_the_export_loads_into_the_stock_sd3_pipeline_and_samples_as_the_student(sd3_teacher, tmp_path):
    pipe = load_tiny_sd3(sd3_teacher)
    grid = SlotGrid.from_scheduler(pipe.scheduler.config, 3, 2)
    trainer = Trainer(load_unet(sd3_teacher, kind="sd3"), pipe.scheduler.config, grid, method_config(**POINTWISE))
    g = torch.Generator().manual_seed(1)
    trainer.load_trainable_state_dict({k: 0.05 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v
                                       for k, v in trainer.trainable_state_dict().items()})
    export = trainer.export(tmp_path / "export", teacher=str(sd3_teacher), model_card={},
                            load_arguments={"text_encoder_3": None, "tokenizer_3": None},
                            call_arguments={"max_sequence_length": T5_TOKENS})
    info = json.loads((export / "inference.json").read_text())
    assert info["set_timesteps"] == {"sigmas": pre_shift_sigmas(3)} and info["pipeline"] == "StableDiffusion3Pipeline"

    pipe.load_lora_weights(str(export))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export / "scheduler")
    (name,) = pipe.get_active_adapters()
    loaded, ours = get_peft_model_state_dict(pipe.transformer, adapter_name=name), get_peft_model_state_dict(trainer.unet)
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)  # nothing missing

    prompts = ["a red circle", "green triangle"]
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    teacher = load_teacher(sd3_teacher, max_sequence_length=T5_TOKENS)
    student = trainer.sample(latents, encode_prompts(teacher, prompts))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompts, latents=latents.clone(), num_inference_steps=3, sigmas=info["set_timesteps"]["sigmas"],
                 guidance_scale=1.0, max_sequence_length=T5_TOKENS, output_type="latent").images
    assert (stock - student).abs().max() / stock.abs().max() <= 1e-4
    assert (student - latents).abs().max() > 0.1

    # The card's own code, as a user pastes it, runs.
    card = (export / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("<this folder>", str(export))
    assert f"max_sequence_length={T5_TOKENS}" in code and "text_encoder_3=None" in code
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's code is what is under test
    assert scope["image"].size == (32, 32)


def readme_flow_commands(block: int = 0) -> list[list[str]]:
    """The commands of the README's "Rectified-flow teachers" section's ``block``-th bash block
    (0: the stages, 1: PCM on the same store), as argv lists."""
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Rectified-flow teachers"):]
    code = section.split("```bash\n")[block + 1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line.split("  #", 1)[0]) for line in code.splitlines() if line.startswith("rapm ")]


@pytest.mark.slow
def test_the_readme_flow_teacher_commands_run_as_typed(tmp_path):
    """Ingest, trajectories, store inspect, distill, evaluate on the embedded flow teacher, as the README has them."""
    commands = [c for c in readme_flow_commands() if c[1] != "demo-flow"]  # that one: tests/test_flow_demo.py
    assert [c[1] for c in commands] == ["ingest", "trajectories", "store", "distill", "evaluate", "sample"]
    (tmp_path / "assets").symlink_to(Path(__file__).parent.parent / "assets")
    captions = [f"a {size} {colour} circle at the {where}" for size in ("small", "large")
                for colour in ("red", "blue") for where in ("left", "top")]
    (tmp_path / "shapes-captions.txt").write_text("\n".join(captions) + "\n")
    outputs = []
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "flows.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        outputs.append(done.stdout)
    assert json.loads(outputs[2])["stock_sigmas"] == pre_shift_sigmas(4 * 10)
    rows = {r["sampler"]: r for r in json.loads((tmp_path / "work/flow-run/eval/metrics.json").read_text())["samplers"]}
    assert list(rows) == ["teacher_ref", "teacher_ddim", "dpm_solver", "student"]
    assert rows["student"]["nfe"] == 4 and rows["student"]["latent_mse"] > 0
    assert len(list((tmp_path / "work/flow-samples").glob("prompt000-image*.png"))) == 2
