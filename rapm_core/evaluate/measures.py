"""The benchmark's measures: fidelity to the reference sample, cost per image, and the
distribution metrics real SD teachers are compared on (Inception FID, CLIP score).

Inception FID and CLIP score need weights nobody may download here, so both take them from the
user (a local file or directory, or a feature network) and fail with a ConfigError saying what to
pass instead of trying the hub. Images are uint8 (B, 3, H, W), the convention torchmetrics'
Inception network and CLIP processors expect.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rapm_core.errors import ConfigError
from rapm_core.evaluate.safe_export import load_exported_network
from storage.hashing import tree_sha256


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference, (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB, (B,); identical images give +inf."""
    mse = latent_mse(a, b)
    return 10 * torch.log10(data_range**2 / mse)


def finite_mean(values: torch.Tensor) -> float | None:
    """Mean over samples, or None when any is infinite (the reference compared with itself)."""
    m = float(values.double().mean())
    return m if math.isfinite(m) else None


def nfe_per_image(num_steps: int, guidance: float) -> int:
    """UNet evaluations one image costs: CFG doubles every step (cond and uncond)."""
    return num_steps * (2 if guidance > 1.0 else 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) float in [0, 1] (what the teacher's VAE decode gives) → (B, 3, H, W) uint8."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"Inception weights {str(path)!r} not found; pass torch-fidelity's "
                          f"pt_inception-2015-12-05 .pth file or an exported .pt2 feature network "
                          f"(this machine cannot download it)")
    return path


def feature_network(weights: str | Path) -> nn.Module:
    """The FID feature network in a local file: torch-fidelity's Inception weights (``.pth``,
    the network torchmetrics' FID runs), or any network exported with ``torch.export.save``
    (``.pt2``) that maps uint8 images (B, 3, H, W) to features (B, D)."""
    path = weights_file(weights)
    if path.suffix == ".pt2":
        return load_exported_network(path)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ConfigError("Inception FID with a .pth needs the torch-fidelity package (pip install torch-fidelity)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(path))


class _TensorFeatures(nn.Module):
    """transformers ≥ 5 returns model outputs from ``get_*_features``; torchmetrics 1.9 expects the
    projected tensor (the output's ``pooler_output``). This hands it that tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))

    @property
    def config(self):
        return self.model.config


def clip_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"CLIP model {str(path)!r} is not a local transformers CLIPModel directory "
                          f"(config.json, weights and processor files); download one, e.g. openai/clip-vit-large-patch14")
    return path


def _clip_loader(model_dir: str | Path) -> Callable[[], tuple[nn.Module, object]]:
    path = clip_model_dir(model_dir)

    def load():
        from transformers import CLIPModel, CLIPProcessor

        try:
            return _TensorFeatures(CLIPModel.from_pretrained(path).eval()), CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"cannot load CLIP model from {str(path)!r}: {first}") from err

    return load


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model_dir: str | Path, batch_size: int = 64) -> float:
    """torchmetrics' CLIPScore (100 · cosine, clipped at 0) of uint8 images against their prompts."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    metric = CLIPScore(model_name_or_path=_clip_loader(model_dir))
    for i in range(0, len(prompts), batch_size):
        metric.update(images[i:i + batch_size], prompts[i:i + batch_size])
    return float(metric.compute())


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row."""
    d = torch.cdist(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the 0 to itself comes first


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) and coverage (Naeem et al. 2020)
    of two feature sets (N, D), with each set's manifold the union of k-NN balls around its samples.

    Precision: share of fakes inside the real manifold (fidelity). Recall: share of reals inside the
    fake manifold (diversity: a collapsed generator has low recall whatever its FID). Coverage:
    share of reals whose own ball holds a fake (like recall, robust to fake outliers).
    """
    real, fake = real.double(), fake.double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"k-NN precision/recall needs more than k={k} samples per set")
    real_r, fake_r = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    d = torch.cdist(real, fake)  # (real, fake)
    return {"precision": float((d <= real_r[:, None]).any(dim=0).double().mean()),
            "recall": float((d <= fake_r[None, :]).any(dim=1).double().mean()),
            "coverage": float((d.min(dim=1).values <= real_r).double().mean())}


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, subsets: int = 50,
                    subset_size: int = 100) -> float:
    """torchmetrics' KID (unbiased MMD², cubic kernel) between uint8 image sets through ``feature``,
    a network mapping uint8 (B, 3, H, W) to (B, D); subsets no larger than the smaller set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        # Its notice that features are buffered: an evaluation holds them anyway (KID needs all).
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted")
        metric = KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    # Its subsets are drawn from torch's global generator: seeded here (and the caller's state
    # restored), so the same two sets always give the same KID and a report can be reproduced.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, _std = metric.compute()
    return float(mean)


def clip_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the CLIP directory's files: stored CLIP terms name the model that made them."""
    _clip_loader(model_dir)  # the directory check, with its message
    return tree_sha256(model_dir)


def load_clip(model_dir: str | Path) -> tuple[nn.Module, object]:
    """The local CLIP model (wrapped as torchmetrics 1.9 expects) and its processor."""
    return _clip_loader(model_dir)()


@torch.no_grad()
def clip_scores_per_image(images: torch.Tensor, prompts: list[str], clip: tuple[nn.Module, object]) -> torch.Tensor:
    """Each image's term of torchmetrics' CLIPScore (100 · cosine to its prompt), (B,) float32.

    torchmetrics' own update function computes them, so a store of these terms gives exactly its
    score: the mean, clipped at 0 (:func:`clip_score_from_terms`)."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    model, processor = clip
    device = next(model.parameters()).device
    score, _ = _clip_score_update(images.to(device), list(prompts), model, processor)
    return score.float().cpu()


def clip_score_from_terms(terms: torch.Tensor) -> float:
    """CLIPScore.compute on per-image terms: their mean, clipped at 0."""
    return max(float(terms.double().mean()), 0.0)
