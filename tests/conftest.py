"""Shared fixtures: what the tests build on disk (tiny teachers, trajectory stores, a finished
tiny run, a tiny CLIP, a tiny exported feature network), built once where they are only read,
and a quiet single-threaded torch so parallel test processes on a 2-core machine don't fight over
cores. Plain helpers that cannot be fixtures are in :mod:`rapm_testing.helpers`."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Inherited by every rapm process a test starts: two test workers (make test runs pytest-xdist)
# plus a two-thread torch per process made OpenMP spin on a 2-core machine, many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from pathlib import Path

import pytest
import torch

from rapm_testing.helpers import EVAL_PROMPTS, TinyFeatures, is_sd3_dir, method_config
from rapm_testing.tiny_sd3 import TEST_T5_TOKENS, build_tiny_sd3
from rapm_testing.tiny_teacher import build_tiny_sd15, build_tiny_sdxl, char_tokenizer

# s3_bucket: a real S3 server in a subprocess; prefect_stack: the project's own local Prefect stack
pytest_plugins = ["s3_server", "prefect_stack"]

torch.set_num_threads(1)

STORE_PROMPTS = ["a red circle", "two blue squares", "a green triangle on grey"]


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny SD3-class teacher without T5 (``make_store`` keeps ``TEST_T5_TOKENS`` per prompt)."""
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "teacher", with_t5=False)


@pytest.fixture(scope="session")
def tiny_sd15_vpred_dir(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15-v"), prediction_type="v_prediction")


# -- trajectory stores and runs, made by the stages' own functions ---------------------------------
def _make_store(root: Path, teacher_dir: Path, num: int = 3, slots: int = 2, steps_per_slot: int = 2,
                prompts: list[str] | None = None, **options) -> Path:
    """``root``/trajectories.zarr: a real store from a real prompt store (``root``/prompts);
    ``options``: further TrajectoriesConfig fields (e.g. an SD3 store's ``max_sequence_length``)."""
    from rapm_core.trajectories.config import TrajectoriesConfig
    from rapm_core.trajectories.generate import generate_trajectories
    from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

    if is_sd3_dir(teacher_dir):
        options.setdefault("max_sequence_length", TEST_T5_TOKENS)
    texts = (prompts or STORE_PROMPTS)[:num]
    prompt_store = root / "prompts"
    write_prompt_store(prompt_store, [PromptRecord(prompt_id(t), t) for t in texts])
    out = root / "trajectories.zarr"
    generate_trajectories(TrajectoriesConfig(
        prompts=str(prompt_store), teacher=str(teacher_dir), out=str(out), slots=slots, steps_per_slot=steps_per_slot,
        guidance=3.0, device="cpu", batch_size=num, store_dtype="float32", **options), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def make_store():
    """``make_store(root, teacher_dir, num=3, slots=2, steps_per_slot=2, prompts=None)``: a tiny
    trajectory store (fp32, guidance 3) under ``root``, for a test or a fixture of any scope."""
    return _make_store


def _build_tiny_run(root: Path, teacher_dir: Path, iterations: int = 3) -> tuple[Path, Path, Path]:
    """prompt store → trajectory store (N=2, M=2) → a few distillation iterations, by the stages' own functions."""
    from rapm_core.distill.config import DistillRunConfig
    from rapm_core.distill.run import run_distillation
    from rapm_core.ingest.config import IngestConfig
    from rapm_core.ingest.engine import ingest_prompts
    from rapm_core.trajectories.config import TrajectoriesConfig
    from rapm_core.trajectories.generate import generate_trajectories

    source = root / "prompts.txt"
    source.write_text("\n".join(EVAL_PROMPTS) + "\n", encoding="utf-8")
    prompts = root / "prompts"
    ingest_prompts(IngestConfig(source=str(source), out=str(prompts), eval_fraction=0.4, seed=1))
    store = root / "trajectories.zarr"
    generate_trajectories(TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(store), slots=2,
                                             steps_per_slot=2, guidance=3.0, device="cpu", batch_size=8),
                          log=lambda _: None)
    run = root / "run"
    method = method_config(disc_channels=8, lr=1e-2, lr_disc=1e-2, loss_relative="both", loss_absolute="both")
    run_distillation(DistillRunConfig(trajectories=str(store), out=str(run), iterations=iterations,
                                      checkpoint_every=iterations, device="cpu", **dict(method)), log=lambda _: None)
    return prompts, store, run


@pytest.fixture(scope="session")
def build_tiny_run():
    """``build_tiny_run(root, teacher_dir, iterations=3)`` → (prompt store, trajectory store, run dir)."""
    return _build_tiny_run


@pytest.fixture(scope="session")
def _tiny_run_once(tmp_path_factory, tiny_sd15_dir):
    return _build_tiny_run(tmp_path_factory.mktemp("tiny-run"), tiny_sd15_dir)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _tiny_run_once):
    """A finished 3-iteration run of the tiny SD 1.5 teacher (its prompt store has an eval split):
    (prompts, store, run). Trained once per session; each test module gets its own copy of the run
    dir to evaluate, sample or damage, the stores beside it are shared and only read."""
    prompts, store, run = _tiny_run_once
    return prompts, store, Path(shutil.copytree(run, tmp_path_factory.mktemp("tiny-run-copy") / "run"))


# -- stand-ins for the evaluation's networks: random weights, real file formats ------------------
@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel and its processor saved as a local directory, as a user's CLIP would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("tiny-clip")
    tok = char_tokenizer(max_length=77)
    torch.manual_seed(0)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    # A random CLIP's cosines hover around 0, where the metric clips; a shared offset in both towers'
    # final norms makes them positive and input-dependent, so the score is a real number to check.
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.fill_(2.0)
        model.text_model.final_layer_norm.bias.fill_(2.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(d)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_features_pt2(tmp_path_factory) -> Path:
    """``TinyFeatures(0)`` saved with torch.export (any batch size, 32² images): a --fid-weights
    .pt2. Shared: a test that alters the archive copies it first."""
    path = tmp_path_factory.mktemp("tiny-features") / "features.pt2"
    net = TinyFeatures(0).eval()
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


# -- a ``rapm`` command in this process --------------------------------------------------------------
@pytest.fixture
def rapm_in_process(capsys, monkeypatch):
    """``rapm_in_process(args)`` → (exit code, stdout, stderr): ``rapm ARGS`` through its own main in
    this process, without a Prefect server (a flow's body runs here). For what a command decides
    before it runs anything; what depends on a process of its own (signals, locks between
    processes, hash seeds, import-time output) is run with ``rapm_testing.helpers.run_rapm``."""
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()  # what came before is not this command's
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run
