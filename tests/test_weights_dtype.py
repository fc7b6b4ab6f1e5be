"""``rapm distill --weights-dtype bf16``: the frozen teacher UNet or SD3-class transformer held in bf16
(LoRA and heads fp32) trains on CPU without autocast, resumes exactly, and exports a LoRA stock
diffusers loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from pydantic import ValidationError
from safetensors.torch import load_file

from flows.cli import main
from rapm_core.distill.config import DistillRunConfig, MethodConfig
from rapm_core.distill.run import build_trainer, run_distillation
from rapm_testing.helpers import is_sd3_dir, run_config
from rapm_testing.tiny_sd3 import TEST_T5_TOKENS, load_tiny_sd3
from storage.trajectory_store import TrajectoryStore

BF16 = {"weights_dtype": "bf16"}


@pytest.fixture(scope="module", params=["tiny_sd15_dir", "tiny_sd3_dir"], ids=["unet", "sd3"])
def teacher(request) -> Path:
    """A UNet teacher and an SD3-class transformer teacher."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher, make_store):
    return make_store(tmp_path_factory.mktemp("bf16-store"), teacher, num=2)


def _quiet(_msg: str) -> None:
    pass


def _lora(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "pytorch_lora_weights.safetensors")


def test_the_teacher_is_held_in_bf16_and_the_trainables_in_fp32(store, tmp_path):
    trainer = build_trainer(run_config(store, tmp_path / "run", method=BF16), TrajectoryStore(str(store)))
    frozen = {p.dtype for n, p in trainer.unet.named_parameters() if ".lora_" not in n}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in trainer.lora_params} == {torch.float32}
    assert {p.dtype for p in trainer.heads.parameters()} == {torch.float32}


def _stock_pipeline(teacher: Path, export: Path):
    """The teacher's stock diffusers pipeline (fp32 weights, as one would deploy it) with the
    export's LoRA and scheduler, and the LoRA's denoiser."""
    if is_sd3_dir(teacher):
        pipe = load_tiny_sd3(teacher)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(export)
    return pipe, pipe.transformer if is_sd3_dir(teacher) else pipe.unet


def test_bf16_weights_train_resume_exactly_and_export(store, tmp_path, teacher):
    # Adversarial and pointwise terms both (run_config's default): bf16 features reach fp32 heads.
    straight = run_config(store, tmp_path / "straight", iterations=4, checkpoint_every=2, method=BF16)
    done = run_distillation(straight, log=_quiet)
    rows = [json.loads(line) for line in (Path(straight.out) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("nonfinite" not in r for r in rows)
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float))
    lora = _lora(Path(done.export_dir))
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and max(float(v.abs().max()) for v in ups) > 0  # LoRA B starts at zero: it moved
    assert {v.dtype for v in lora.values()} == {torch.float32}

    # Stopped after 2 and extended to 4: bit-identical to the straight run.
    resumed = run_config(store, tmp_path / "resumed", iterations=2, checkpoint_every=2, method=BF16)
    run_distillation(resumed, log=_quiet)
    run_distillation(resumed.model_copy(update={"iterations": 4}), log=_quiet)
    again = _lora(Path(resumed.out) / "export")
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)

    # A stock pipeline loads the export (here on fp32 weights, as one would deploy it).
    pipe, denoiser = _stock_pipeline(teacher, Path(done.export_dir))
    loaded = get_peft_model_state_dict(denoiser, adapter_name=pipe.get_active_adapters()[0])
    trained = {k.split(".", 1)[1]: v for k, v in lora.items()}  # without the "unet."/"transformer." prefix
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    extra = {"max_sequence_length": TEST_T5_TOKENS} if is_sd3_dir(teacher) else {}
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra).images[0]
    assert image.shape[-1] == 3 and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_bf16_weights_change_the_run_but_fp32_keeps_old_hashes():
    fp32 = DistillRunConfig(trajectories="S", out="R")
    assert "weights_dtype" not in fp32.hashed()["training"]  # run dirs made before the option keep their hash
    bf16 = DistillRunConfig(trajectories="S", out="R", **dict(MethodConfig.from_options(**BF16)))
    assert bf16.hashed()["training"]["weights_dtype"] == "bf16"


def test_fp16_weights_need_the_fp16_loss_scaler(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the CLI creates --out's lock before it reads the options
    with pytest.raises(ValidationError, match="mixed_precision 'fp16'"):
        MethodConfig.from_options(weights_dtype="fp16")
    code = main(["distill", "--trajectories", "S", "--out", "R", "--weights-dtype", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "mixed_precision 'fp16'" in err
