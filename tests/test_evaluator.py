from pathlib import Path

import numpy as np
import pytest
import torch

from rapm_shapes.evaluator import (
    attribute_accuracy, features, images_from_uint8, images_to_uint8, load_evaluator,
    predict_attributes, prompt_adherence,
)
from rapm_shapes.shapes import all_prompts, caption, make_dataset, render_prompts
from rapm_shapes.train_evaluator import train_evaluator
from rapm_core.errors import ConfigError
from rapm_core.evaluate.features import frechet_distance, gaussian_stats

ASSET = Path(__file__).resolve().parents[1] / "assets" / "shapes-evaluator"


@pytest.fixture(scope="module")
def judge():
    return load_evaluator(ASSET)


def test_committed_evaluator_reads_fresh_renders(judge):
    images, attrs = make_dataset(200, seed=424242)  # neither training's nor the card's held-out seed
    acc = attribute_accuracy(predict_attributes(judge, images_from_uint8(images)), attrs)
    assert min(acc.values()) >= 0.99, acc


def test_adherence_is_one_on_real_renders_and_low_on_wrong_prompts(judge):
    prompts = all_prompts()[::3]
    images = images_from_uint8(render_prompts(prompts, seed=5))
    assert prompt_adherence(judge, images, prompts) == 1.0
    assert prompt_adherence(judge, images, prompts[1:] + prompts[:1]) < 0.1
    with pytest.raises(ConfigError):
        prompt_adherence(judge, images, prompts[:-1])


def test_uint8_conversion_round_trips():
    images, _ = make_dataset(4, seed=0)
    x = images_from_uint8(images)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(images_to_uint8(x), images)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 0.0, 1.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    a = mu_a + sd_a * rng.standard_normal((200_000, 3))
    b = mu_b + sd_b * rng.standard_normal((200_000, 3))
    expected = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance(gaussian_stats([a]), [b]) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(gaussian_stats([a]), [a]) == pytest.approx(0.0, abs=1e-6)


def test_domain_fid_separates_real_from_degraded(judge):
    prompts = all_prompts()
    real_a = images_from_uint8(render_prompts(prompts, seed=1))
    real_b = images_from_uint8(render_prompts(prompts, seed=2))
    blurred = torch.nn.functional.avg_pool2d(real_b, 5, 1, 2, count_include_pad=False)
    fa = gaussian_stats([features(judge, real_a)])
    assert frechet_distance(fa, [features(judge, blurred)]) > 3 * frechet_distance(fa, [features(judge, real_b)])


def test_evaluator_recipe_runs_end_to_end_at_toy_size(tmp_path):
    metrics = train_evaluator(tmp_path, n_train=256, n_val=32, steps=4, batch_size=16, width=4, feature_dim=8,
                              log_every=2)
    judge = load_evaluator(tmp_path)
    assert set(metrics) >= {"held_out_accuracy_all", "held_out_accuracy_shape", "train_s"}
    assert features(judge, images_from_uint8(make_dataset(3, seed=1)[0])).shape == (3, 8)
    assert (tmp_path / "training_log.jsonl").read_text().count('"event": "train"') == 2
    assert caption(predict_attributes(judge, images_from_uint8(make_dataset(1, seed=1)[0]))[0])
