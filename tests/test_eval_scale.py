"""Evaluation at the paper's scale: the resumable, shardable feature store and the metrics from it.

Tiny random networks stand in for Inception (a torch.export'ed conv net, the real .pt2 path) and
CLIP (a random CLIPModel directory); the README's commands run as typed on tiny stand-ins.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main as rapm_main
from flows.interrupts import where_stopped
from rapm_core.errors import ConfigError
from rapm_core.evaluate import features, measures
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.run import evaluate_run
from rapm_testing.helpers import EVAL_PROMPTS, TinyFeatures
from storage.eval_store import EvalStore
from storage.hashing import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _images(seed: int, n: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _write_folder(folder: Path, images: torch.Tensor, size: tuple[int, int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        (picture.resize(size) if size else picture).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_run, tiny_features_pt2, tiny_clip_dir):
    """A tiny finished run, the tiny feature network and CLIP, and a folder of real images."""
    root = tmp_path_factory.mktemp("eval-scale")
    prompts, store, run = tiny_run
    return {"root": root, "prompts": prompts, "store": store, "run": run,
            "weights": tiny_features_pt2, "clip": tiny_clip_dir,
            "real": _write_folder(root / "real", _images(7, 5), size=(40, 32))}  # 4:3-ish, cropped to square


def _config(assets, run: Path, store: Path | None, **kw) -> EvaluateConfig:
    base = dict(run=str(run), trajectories=str(assets["store"]), num_images=6, batch_size=2, device="cpu",
                evaluator="none", fid_weights=str(assets["weights"]), clip_model=str(assets["clip"]), grid_rows=3,
                trajectory_rows=1, feature_store=None if store is None else str(store))
    return EvaluateConfig(**{**base, **kw})


def _copy_run(assets, to: Path) -> Path:
    return Path(shutil.copytree(assets["run"], to, ignore=shutil.ignore_patterns("eval")))


def _stored(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every stored array but the timings, per method."""
    store = EvalStore(str(path))
    return {m: {k: v for k, v in store.arrays(m).items() if k != "seconds"} for m in store.methods()}


def _assert_same_store(a: Path, b: Path) -> None:
    ours, ref = _stored(a), _stored(b)
    assert sorted(ours) == sorted(ref) == ["dpm_solver", "student", "teacher_ddim", "teacher_ref"]
    for method in ref:
        assert sorted(ours[method]) == sorted(ref[method])
        for name in ref[method]:
            assert np.array_equal(ours[method][name], ref[method][name]), (method, name)


def _metric_rows(result) -> dict[str, dict]:
    return {r["sampler"]: {k: r.get(k) for k in ("inception_fid", "inception_fid_to_teacher", "clip_score")}
            for r in result.rows}


# -- the statistics, against torchmetrics ------------------------------------------------------
def _torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor, net: torch.nn.Module, batch_size: int = 7) -> float:
    """The oracle: torchmetrics' FrechetInceptionDistance run on the images, as its docs show."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=net, input_img_size=tuple(real.shape[1:]))
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, images.shape[0], batch_size):
            metric.update(images[i:i + batch_size], real=is_real)
    return float(metric.compute())


def test_fid_from_accumulated_features_equals_torchmetrics():
    net = TinyFeatures()
    real, fake = _images(0, 40), _images(1, 33)
    expected = _torchmetrics_fid(real, fake, net)
    # other batches than torchmetrics saw: sums commute
    reference = features.gaussian_stats(features.image_features(net, real[a:a + 5]) for a in range(0, 40, 5))
    ours = features.frechet_distance(reference, (features.image_features(net, fake[a:a + 4]) for a in range(0, 33, 4)))
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-5)
    # a foreign reference (mu and sigma only, no count) gives the same distance
    foreign = features.GaussianStats(reference.mu, reference.sigma)
    assert features.frechet_distance(foreign, [features.image_features(net, fake)]) == pytest.approx(expected, rel=1e-5)
    assert features.frechet_distance(reference, [features.image_features(net, real)]) == pytest.approx(0, abs=1e-6)


def test_clip_score_from_terms_equals_torchmetrics(assets):
    images = _images(3, 5)
    prompts = EVAL_PROMPTS[:5]
    expected = measures.clip_score(images, prompts, assets["clip"], batch_size=2)
    clip = measures.load_clip(assets["clip"])
    terms = torch.cat([measures.clip_scores_per_image(images[a:a + 3], prompts[a:a + 3], clip) for a in (0, 3)])
    assert 0 < expected
    assert measures.clip_score_from_terms(terms) == pytest.approx(expected, rel=1e-6)


def test_npz_and_folder_references_agree(assets, tmp_path, capsys):
    out = tmp_path / "ref.npz"
    assert rapm_main(["fid-stats", "--images", str(assets["real"]), "--out", str(out), "--fid-weights",
                      str(assets["weights"]), "--size", "32", "--device", "cpu"]) == 0
    assert "mu/sigma of 5 images" in capsys.readouterr().out
    with np.load(out) as data:
        assert {"mu", "sigma"} <= set(data.files)
    net = measures.feature_network(assets["weights"])
    sha = file_sha256(assets["weights"])
    from_folder = features.reference_stats(str(assets["real"]), lambda: net, sha, (32, 32), cache=str(tmp_path / "s"),
                                           log=lambda _: None)
    from_npz = features.reference_stats(str(out), lambda: net, sha, (32, 32))
    assert np.array_equal(from_folder.mu, from_npz.mu) and np.array_equal(from_folder.sigma, from_npz.sigma)
    assert list(tmp_path.glob("s.fid-ref-*.npz"))  # computed once, cached beside the store
    cached = features.reference_stats(str(assets["real"]), lambda: pytest.fail("recomputed"), sha, (32, 32),
                                      cache=str(tmp_path / "s"), log=lambda _: None)
    assert np.array_equal(cached.sigma, from_folder.sigma)
    # The folder's statistics are torchmetrics' own over the same (cropped, resized) real images.
    real = torch.from_numpy(np.stack([features.real_image(f, (32, 32)) for f in features.image_files(assets["real"])]))
    fake = _images(9, 6)
    assert features.frechet_distance(from_npz, [features.image_features(net, fake)]) == pytest.approx(
        _torchmetrics_fid(real.permute(0, 3, 1, 2).contiguous(), fake, net), rel=1e-5)
    # A foreign .npz (only mu and sigma, as pytorch-fid writes it) is accepted; another size is refused.
    np.savez(tmp_path / "foreign.npz", mu=from_npz.mu, sigma=from_npz.sigma)
    assert features.reference_stats(str(tmp_path / "foreign.npz"), lambda: net, sha, (32, 32)).count is None
    with pytest.raises(ConfigError, match="resized to 32×32"):
        features.reference_stats(str(out), lambda: net, sha, (64, 64))


# -- the store: resume, same numbers as in memory ----------------------------------------------
class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_identical(assets, tmp_path):
    uninterrupted = tmp_path / "whole.zarr"
    whole = evaluate_run(_config(assets, _copy_run(assets, tmp_path / "run-a"), uninterrupted), log=lambda _: None)

    stopped = tmp_path / "stopped.zarr"
    config = _config(assets, _copy_run(assets, tmp_path / "run-b"), stopped)

    def stop_after_five_batches(p):
        if p.done >= 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate_run(config, progress=stop_after_five_batches, log=lambda _: None)
    store = EvalStore(str(stopped))
    assert [int(store.complete_mask(m).sum()) for m in ("teacher_ref", "teacher_ddim")] == [3, 2]
    assert "kept 5/12 complete batches of 4 methods" in where_stopped(
        argparse.Namespace(command="evaluate", feature_store=str(stopped)))  # what Ctrl-C prints
    made = []
    resumed = evaluate_run(config, progress=made.append, log=lambda _: None)
    assert made[-1].done == made[-1].total == 4 * 6 - 10  # only what was missing
    _assert_same_store(stopped, uninterrupted)
    assert _metric_rows(resumed) == _metric_rows(whole)

    # The same evaluation in memory (no store) gives the same numbers: same images, same statistics.
    in_memory = evaluate_run(_config(assets, _copy_run(assets, tmp_path / "run-c"), None), log=lambda _: None)
    for method, row in _metric_rows(in_memory).items():
        assert row["inception_fid"] == pytest.approx(_metric_rows(whole)[method]["inception_fid"], rel=1e-5, abs=1e-9)
        assert row["inception_fid_to_teacher"] == pytest.approx(
            _metric_rows(whole)[method]["inception_fid_to_teacher"], rel=1e-5, abs=1e-9)
        assert row["clip_score"] == pytest.approx(_metric_rows(whole)[method]["clip_score"], rel=1e-6)
    # FID to the teacher: the reference samples against themselves are at distance 0, every other sampler not
    to_teacher = {m: r["inception_fid_to_teacher"] for m, r in _metric_rows(whole).items()}
    itself = to_teacher.pop("teacher_ref")
    assert abs(itself) < 0.01 * min(to_teacher.values()), (itself, to_teacher)  # float32 features: 0 up to rounding
    report = (tmp_path / "run-a" / "eval" / "report.md").read_text()
    assert "Inception FID to teacher" in report
    assert "not measured at this scale: shapes, fidelity" in report and "(grid.png)" in report
    assert EvalStore(str(uninterrupted)).grid("student").shape == (3, 32, 32, 3)


# -- bad input: one line, exit 2 ---------------------------------------------------------------
def _refused(args: list[str], capsys, match: str) -> None:
    assert rapm_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_bad_input_is_one_line_exit_2(assets, tmp_path, capsys):
    run = _copy_run(assets, tmp_path / "run")
    base = ["evaluate", "--run", str(run), "--trajectories", str(assets["store"]), "--num-images", "4",
            "--batch-size", "2", "--device", "cpu", "--evaluator", "none", "--feature-store", str(tmp_path / "s.zarr")]
    _refused(base + ["--fid-weights", str(tmp_path / "missing.pt2")], capsys, "missing.pt2.* not found")
    _refused(["fid-stats", "--images", str(assets["real"]), "--out", str(tmp_path / "r.npz"), "--fid-weights",
              str(tmp_path / "missing.pth"), "--size", "32"], capsys, "not found")
    one = _write_folder(tmp_path / "one", _images(0, 1))
    _refused(["fid-stats", "--images", str(one), "--out", str(tmp_path / "r.npz"), "--fid-weights",
              str(assets["weights"]), "--size", "32"], capsys, "need at least 2 real images")
    _refused(base + ["--fid-weights", str(assets["weights"]), "--fid-reference", str(one)], capsys,
             "need at least 2 real images")
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was sampled
    _refused(["evaluate", "--run", str(run), "--samplers", "student", "--backend", "local-cluster"], capsys,
             "needs --feature-store")
    config = _config(assets, run, tmp_path / "s.zarr", num_images=4, clip_model=None, samplers=["teacher_ref"])
    evaluate_run(config, log=lambda _: None)
    capsys.readouterr()  # the loading bars of that run
    _refused(base + ["--samplers", "teacher_ref", "--seed", "1", "--fid-weights", str(assets["weights"])], capsys,
             "made for another evaluation .*seed: store has 0, this run wants 1")


# -- the README's commands, as typed, on a 2-worker Dask cluster ---------------------------------
def _readme_commands() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Reproduce the paper's table"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _coco_captions(path: Path) -> Path:
    captions = [{"id": i, "image_id": i, "caption": p} for i, p in enumerate(EVAL_PROMPTS)]
    path.write_text(json.dumps({"annotations": captions}), encoding="utf-8")
    return path


@pytest.mark.slow
def test_readme_commands_shard_over_two_workers_like_in_process(assets, tmp_path, monkeypatch):
    commands = _readme_commands()
    assignments = [line for line in commands.splitlines() if re.match(r"^[A-Z]+=", line)]
    assert [a.split("=")[0] for a in assignments] == ["CAPTIONS", "IMAGES", "INCEPTION", "CLIP", "SIZE"]
    body = "\n".join(line for line in commands.splitlines() if line not in assignments)
    shutil.copytree(assets["run"], tmp_path / "work" / "run", ignore=shutil.ignore_patterns("eval"))
    tiny = {"CAPTIONS": _coco_captions(tmp_path / "captions.json"), "IMAGES": assets["real"],
            "INCEPTION": assets["weights"], "CLIP": assets["clip"], "SIZE": 32, "NUM": 6, "BATCH": 2, "GPUS": 2}
    script = "\n".join(["set -euo pipefail", 'rapm() { "$RAPM_PYTHON" -m flows.cli "$@"; }',
                        *(f"{k}={v}" for k, v in tiny.items()), body])
    env = {**os.environ, "RAPM_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "DASK_TEMPORARY_DIRECTORY": str(tmp_path / "dask")}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| RAPM student 2 steps |" in done.stdout and "Inception FID" in done.stdout
    # The Dask workers print to the same terminal: neither they nor the libraries under them talk.
    assert not [m for m in ("distributed.", "[transformers]", "No LoRA keys", "Warning", "it/s]")
                if m in done.stdout + done.stderr], done.stderr

    monkeypatch.chdir(tmp_path)  # the store records the README's relative paths
    sharded = tmp_path / "work" / "eval-coco30k.zarr"
    recorded = EvalStore(str(sharded)).schema.config
    in_process = EvaluateConfig.model_validate({**recorded, "run": str(_copy_run(assets, tmp_path / "run-ip")),
                                                "feature_store": str(tmp_path / "in-process.zarr"),
                                                "execution": {}})
    evaluate_run(in_process, log=lambda _: None)
    _assert_same_store(sharded, tmp_path / "in-process.zarr")


def test_feature_store_and_reference_cache_on_s3(assets, tmp_path, s3_bucket):  # noqa: F811
    import fsspec

    url = f"{s3_bucket}/eval-features.zarr"
    kw = dict(num_images=4, samplers=["teacher_ref", "teacher_ddim"], clip_model=None,
              fid_reference=str(assets["real"]))
    remote = evaluate_run(_config(assets, _copy_run(assets, tmp_path / "run-s3"), url, **kw), log=lambda _: None)
    local = evaluate_run(_config(assets, _copy_run(assets, tmp_path / "run-local"), tmp_path / "local.zarr", **kw),
                         log=lambda _: None)
    assert _metric_rows(remote) == _metric_rows(local)
    ours, ref = _stored(url), _stored(tmp_path / "local.zarr")
    assert all(np.array_equal(ours[m][k], ref[m][k]) for m in ref for k in ref[m])
    fs, _ = fsspec.core.url_to_fs(url)
    assert len(fs.glob("rapm-test/eval-features.zarr.fid-ref-*.npz")) == 1  # the folder's statistics, cached
