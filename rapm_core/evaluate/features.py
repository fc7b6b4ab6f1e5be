"""Inception FID from features: the feature network, Gaussian statistics and reference statistics.

At COCO-30K scale the images of a method are never held at once: each batch's Inception pool
features are written to the evaluation's feature store and FID is computed from statistics of
the stored features. The statistics are torchmetrics' own (:class:`FrechetInceptionDistance`
keeps a float64 feature sum and sum of outer products, then takes the unbiased covariance) and
the distance is that metric's own ``compute`` (:func:`frechet_distance`), so FID from stored
features is the FID torchmetrics gives on the same images (tests/test_eval_scale.py checks it).

The real side is reference statistics (mu, sigma), computed once from a folder of real images by
``rapm fid-stats`` with the same feature network and the same resize as the generated images,
or taken from a precomputed .npz under the key names pytorch-fid and torch-fidelity use (``mu``,
``sigma``). An .npz written here also records the feature network's sha256 and the image size,
so statistics made with another network or size are refused instead of compared.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from rapm_core.errors import ConfigError
from storage.hashing import config_hash
from storage.urls import exists, is_url, read_bytes, write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def real_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A real image as the generated side sees it: centre-cropped to the (H, W) ``size``'s aspect
    ratio, then bicubic-resized to it, (H, W, 3) uint8. COCO photos are 4:3 and the teacher's
    images square: a plain resize would squash every real image and bias FID."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    h, w = size
    scale = min(image.width / w, image.height / h)
    cw, ch = round(w * scale), round(h * scale)
    left, top = (image.width - cw) // 2, (image.height - ch) // 2
    return np.asarray(image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC))


def image_files(folder: str | Path, what: str = "Inception FID") -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{folder}: not a folder of real images (png/jpg/webp) for {what}")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ConfigError(f"{folder}: need at least 2 real images (png/jpg/webp) for {what}, found {len(files)}")
    return files


class StatsAccumulator:
    """Feature sum and sum of outer products in float64, exactly as torchmetrics' FID accumulates them."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.count = 0

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        f = torch.as_tensor(features).double()
        if self.total is None:
            self.total, self.outer = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(
                f.shape[1], f.shape[1], dtype=torch.float64)
        self.total += f.sum(dim=0)
        self.outer += f.t().mm(f)
        self.count += f.shape[0]

    def stats(self) -> "GaussianStats":
        if self.count < 2:
            raise ConfigError(f"FID needs at least 2 images per set, got {self.count}")
        mu = (self.total / self.count).unsqueeze(0)
        sigma = (self.outer - self.count * mu.t().mm(mu)) / (self.count - 1)
        return GaussianStats(mu.squeeze(0).numpy(), sigma.numpy(), self.count)


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    feature_sha256: str | None = None  # the feature network's file; None for a foreign .npz
    image_size: tuple[int, int] | None = None  # (H, W) the real images were resized to

    def npz_bytes(self) -> bytes:
        extra = {k: np.asarray(v) for k, v in (("count", self.count), ("feature_sha256", self.feature_sha256),
                                                ("image_size", self.image_size)) if v is not None}
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, **extra)
        return buffer.getvalue()


def load_stats(path: str) -> GaussianStats:
    """Reference statistics from an .npz (path or URL) with ``mu`` (D,) and ``sigma`` (D, D)."""
    try:
        with np.load(io.BytesIO(read_bytes(str(Path(path).expanduser()) if not is_url(path) else path)),
                     allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ConfigError(f"{path}: an FID reference .npz needs arrays 'mu' and 'sigma' "
                                  f"(pytorch-fid/torch-fidelity names), found {sorted(data.files)}")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            sha = str(data["feature_sha256"]) if "feature_sha256" in data else None
            size = tuple(int(s) for s in data["image_size"]) if "image_size" in data else None
            count = int(data["count"]) if "count" in data else None
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot read FID reference statistics ({str(err).splitlines()[0]})") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not (np.isfinite(mu).all()
                                                                          and np.isfinite(sigma).all()):
        raise ConfigError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), finite; got {mu.shape} and {sigma.shape}")
    return GaussianStats(mu, sigma, count, sha, size)


class _GivenFeatures(nn.Module):
    """The "feature network" of a torchmetrics FID whose inputs are features already extracted."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def gaussian_stats(blocks: Iterable[torch.Tensor | np.ndarray]) -> GaussianStats:
    """Statistics of one feature set given in blocks (rows are samples)."""
    acc = StatsAccumulator()
    for block in blocks:
        acc.update(block)
    return acc.stats()


def frechet_distance(reference: GaussianStats, generated: Iterable[torch.Tensor | np.ndarray]) -> float:
    """The project's one Fréchet distance: torchmetrics' :class:`FrechetInceptionDistance` between
    a reference (its real side, merged in as the feature sums its statistics come from) and the
    generated features, fed in blocks (its fake side). Domain FID, Inception FID in memory and from
    a feature store, and FID to the teacher all come from here."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    dim = reference.mu.shape[0]
    metric = FrechetInceptionDistance(feature=_GivenFeatures(dim))
    count = reference.count or 2  # compute() divides by the same count: any n ≥ 2 gives back mu and sigma
    mu, sigma = torch.from_numpy(reference.mu).double(), torch.from_numpy(reference.sigma).double()
    metric.merge_state({
        "real_features_sum": count * mu, "real_features_cov_sum": (count - 1) * sigma + count * torch.outer(mu, mu),
        "real_features_num_samples": torch.tensor(count),
        "fake_features_sum": torch.zeros(dim, dtype=torch.float64),
        "fake_features_cov_sum": torch.zeros(dim, dim, dtype=torch.float64),
        "fake_features_num_samples": torch.tensor(0)})
    images = 0
    for block in generated:
        block = torch.as_tensor(block)
        if block.ndim != 2 or block.shape[1] != dim:
            raise ConfigError(f"FID reference has {dim} features, the feature network gives "
                              f"{block.shape[-1] if block.ndim else 0}")
        metric.update(block, real=False)
        images += block.shape[0]
    if images < 2:
        raise ConfigError(f"FID needs at least 2 images per set, got {images}")
    # A squared distance: a set against its own statistics comes out a rounding error below zero.
    return max(float(metric.compute()), 0.0)


@torch.no_grad()
def image_features(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Features (B, D) float32 of uint8 images (B, 3, H, W), on the network's device."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return net(images.to(device)).float().cpu().numpy()


def folder_stats(folder: str | Path, net: nn.Module, size: tuple[int, int], sha256: str | None,
                 batch_size: int = 50) -> GaussianStats:
    """Statistics of every image in ``folder``, streamed in batches (a 30K folder never sits in memory)."""
    files, acc = image_files(folder), StatsAccumulator()
    for a in range(0, len(files), batch_size):
        batch = np.stack([real_image(f, size) for f in files[a:a + batch_size]])
        acc.update(image_features(net, torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()))
    stats = acc.stats()
    return GaussianStats(stats.mu, stats.sigma, stats.count, sha256, tuple(size))


def folder_signature(folder: str | Path) -> str:
    """Names and sizes of a reference folder's images: what its cached statistics were made from."""
    return config_hash({p.name: p.stat().st_size for p in image_files(folder)})


def check_reference(stats: GaussianStats, source: str, sha256: str | None, size: tuple[int, int]) -> None:
    """Refuse statistics that were made with another feature network or image size."""
    if stats.feature_sha256 is not None and sha256 is not None and stats.feature_sha256 != sha256:
        raise ConfigError(f"{source}: made with another feature network (sha256 {stats.feature_sha256[:12]}, "
                          f"--fid-weights has {sha256[:12]}); recompute it with `rapm fid-stats`")
    if stats.image_size is not None and tuple(stats.image_size) != tuple(size):
        raise ConfigError(f"{source}: made from real images resized to {stats.image_size[0]}×{stats.image_size[1]}, "
                          f"the generated images are {size[0]}×{size[1]}; recompute it with --size {size[0]}")


def check_reference_source(source: str) -> None:
    """Fail before sampling, not after 30K images, when ``--fid-reference`` cannot be used."""
    if Path(source).expanduser().is_dir():
        image_files(source)
    elif is_url(source) or Path(source).expanduser().is_file():
        load_stats(source)
    else:
        raise ConfigError(f"--fid-reference {source}: neither a folder of real images nor an .npz of mu/sigma")


def reference_stats(source: str, net: Callable[[], nn.Module], sha256: str | None, size: tuple[int, int],
                    cache: str | None = None, log: Callable[[str], None] = print) -> GaussianStats:
    """The real side of FID: an .npz as given, or a folder's statistics, computed once.

    A folder's statistics are kept beside ``cache`` (the feature store) as
    ``STORE.fid-ref-<hash>.npz``, named by the folder's files, the feature network and the size,
    so a re-run or another method set reuses them and a changed folder is recomputed; ``net``
    is only loaded when they must be computed."""
    check_reference_source(source)
    if not Path(source).expanduser().is_dir():
        stats = load_stats(source)
        check_reference(stats, source, sha256, size)
        return stats
    key = config_hash({"files": folder_signature(source), "sha256": sha256, "size": list(size)})[:16]
    cached = f"{str(cache).rstrip('/')}.fid-ref-{key}.npz" if cache else None
    if cached and exists(cached):
        log(f"FID reference: statistics of {source} from {cached}")
        return load_stats(cached)
    log(f"FID reference: computing statistics of the real images in {source}")
    stats = folder_stats(source, net(), size, sha256)
    if cached:
        write_bytes(cached, stats.npz_bytes())
        log(f"FID reference: cached as {cached}")
    return stats
