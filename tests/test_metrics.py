import math

import pytest
import torch
from torch import nn

from rapm_core.errors import ConfigError
from rapm_core.evaluate.measures import (
    clip_score,
    feature_network,
    finite_mean,
    latent_mse,
    nfe_per_image,
    psnr,
    to_uint8,
)


def test_mse_and_psnr_known_values():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0] += 0.1  # MSE 0.01 → PSNR 20 dB at range 1
    b[1, 0] += 0.5  # one channel of three: MSE 0.25/3
    assert latent_mse(a, b).tolist() == pytest.approx([0.01, 0.25 / 3])
    assert psnr(a, b).tolist() == pytest.approx([20.0, 10 * math.log10(3 / 0.25)])
    assert psnr(a, b, data_range=2.0)[0] == pytest.approx(20.0 + 20 * math.log10(2))
    assert math.isinf(float(psnr(a, a)[0]))
    assert finite_mean(psnr(a, a)) is None
    assert finite_mean(psnr(a, b)) == pytest.approx((20.0 + 10 * math.log10(12)) / 2)


def test_nfe_counts_both_cfg_branches():
    assert nfe_per_image(40, 7.5) == 80
    assert nfe_per_image(4, 7.5) == 8
    assert nfe_per_image(4, 1.0) == 4


def test_to_uint8_layout_and_range():
    x = torch.tensor([[[[0.0, 0.5, 1.0]]]])  # (1, 1, 1, 3) HWC
    assert to_uint8(x).shape == (1, 3, 1, 1)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255]


def _images(seed, n=24, shift=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 200, (n, 3, 16, 16), generator=g) + shift).clamp(0, 255).to(torch.uint8)


def test_missing_inception_weights_say_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        feature_network(tmp_path / "missing.pth")


def test_clip_score_matches_direct_cosine(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = _images(3, n=5)
    images = torch.nn.functional.interpolate(images.float(), size=32).to(torch.uint8)
    prompts = ["a red circle", "a blue square", "a small green triangle", "yellow", "a large circle at the top"]
    score = clip_score(images, prompts, tiny_clip_dir, batch_size=2)

    model, proc = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=list(images), return_tensors="pt")).pooler_output
        txt = model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True)).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt).mean()
    assert 0 < float(cos) < 1
    assert score == pytest.approx(100 * float(cos), abs=1e-3)


def test_clip_score_without_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a local transformers CLIPModel directory"):
        clip_score(_images(0, n=2), ["a", "b"], tmp_path / "nowhere")


def test_knn_precision_recall_sees_a_collapsed_generator():
    from rapm_core.evaluate.measures import knn_precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = knn_precision_recall(real, torch.randn(400, 8, generator=g))
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.8
    collapsed = real[:1].repeat(400, 1) + 0.01 * torch.randn(400, 8, generator=g)  # one mode, near a real sample
    low = knn_precision_recall(real, collapsed)
    assert low["precision"] > 0.9 and low["recall"] < 0.05 and low["coverage"] < 0.05
    assert knn_precision_recall(real, real) == {"precision": 1.0, "recall": 1.0, "coverage": 1.0}


def test_kernel_distance_is_near_zero_for_one_distribution_and_not_for_two():
    from rapm_core.evaluate.measures import kernel_distance

    class MeanColour(nn.Module):
        def forward(self, images):
            return images.float().mean(dim=(2, 3))

    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (120, 3, 4, 4), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (120, 3, 4, 4), generator=g, dtype=torch.uint8)
    shifted = (b.int() // 2).to(torch.uint8)
    same, different = kernel_distance(a, b, MeanColour()), kernel_distance(a, shifted, MeanColour())
    assert abs(same) < 0.1 * different and different > 0


def test_kernel_distance_is_the_same_for_the_same_sets_and_leaves_the_global_generator_alone():
    from rapm_core.evaluate.measures import kernel_distance

    class MeanColour(nn.Module):
        def forward(self, images):
            return images.float().mean(dim=(2, 3))

    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 256, (60, 3, 4, 4), generator=g, dtype=torch.uint8) for _ in range(2))
    kid = [kernel_distance(a, b, MeanColour(), subsets=5, subset_size=20) for _ in range(2)]  # 20 of 60 drawn
    assert kid[0] == kid[1]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    kernel_distance(a, b, MeanColour(), subsets=5, subset_size=20)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
