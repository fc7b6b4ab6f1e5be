"""Metrics behind one small interface, listed once: the ``rapm.metrics`` entry points.

A metric is a class: ``create`` decides from the evaluation config and its prompts whether it
applies (and loads what it needs, e.g. a feature network, real images), ``measure`` scores one
method's samples, and ``columns`` say how the report shows its numbers. The evaluation engine,
the report, the table artifact and the CLI print all read the registered metrics, so a new
metric is one class and one line under ``[project.entry-points."rapm.metrics"]`` in
pyproject.toml. General metrics live here; a domain's own (the shapes domain's FID and prompt
adherence) live in its package, so this one does not depend on any domain. A metric that can
be accumulated image by image also implements :class:`FeatureMetric`, its feature-store side.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch

from rapm_core.evaluate import features, measures
from rapm_core.evaluate.config import REFERENCE, EvaluateConfig
from rapm_core.evaluate.samplers import SamplerSamples
from storage.eval_store import EvalStore
from storage.hashing import file_sha256

ENTRY_POINT_GROUP = "rapm.metrics"


@dataclass(frozen=True)
class Column:
    key: str  # in a metrics row
    title: str
    fmt: str
    chart: bool = True  # a panel in metrics.png


class Metric(ABC):
    name: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]]
    order: ClassVar[int]  # column position in tables (lower first)
    distribution: ClassVar[bool] = True  # compares a distribution, not one image with its reference
    note: str = ""  # what was compared, for the report

    @classmethod
    @abstractmethod
    def create(cls, config: EvaluateConfig, prompts: list[str], reference: SamplerSamples) -> "Metric | None":
        """This metric for one evaluation (``prompts``: one per image), or None if it does not apply."""

    @abstractmethod
    def measure(self, samples: SamplerSamples) -> dict[str, float | None]:
        """One method's numbers, keyed by this metric's column keys."""


@functools.cache
def registered_metrics() -> tuple[type[Metric], ...]:
    found = [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]
    if not found:
        raise RuntimeError(f"no {ENTRY_POINT_GROUP!r} entry points: reinstall the project (pip install -e .)")
    return tuple(sorted(found, key=lambda cls: (cls.order, cls.name)))


# Per-method facts every row carries, after the metrics.
FACT_COLUMNS = (
    Column("nfe", "NFE / image", "{}"),
    Column("images_per_second", "images / s", "{:.3g}"),
    Column("distill_seconds", "distillation wall time (s)", "{:.0f}", chart=False),
)


def table_columns() -> list[Column]:
    """Every column a metrics table can have, in order; the label first."""
    return [Column("label", "sampler", "{}", chart=False), *(c for m in registered_metrics() for c in m.columns),
            *FACT_COLUMNS]


class Fidelity(Metric):
    """Distance to the reference sample from the same noise: latent MSE and image PSNR (range 1)."""

    name, order, distribution = "fidelity", 40, False
    columns = (Column("latent_mse", "latent MSE to ref ↓", "{:.4f}"), Column("psnr", "PSNR to ref (dB) ↑", "{:.2f}"))

    def __init__(self, reference: SamplerSamples):
        self.reference = reference

    @classmethod
    def create(cls, config, prompts, reference):
        return cls(reference)

    def measure(self, samples):
        if samples.spec.name == REFERENCE:
            return {"latent_mse": None, "psnr": None}
        ref = self.reference
        return {"latent_mse": float(measures.latent_mse(samples.latents, ref.latents).mean()),
                "psnr": measures.finite_mean(measures.psnr(samples.images.permute(0, 3, 1, 2),
                                                           ref.images.permute(0, 3, 1, 2)))}


class FeatureMetric(ABC):
    """The feature-store side of a metric (``--feature-store``, the paper's 30K images per method).

    ``extractor`` runs on whichever worker samples a batch and returns per-image arrays that are
    written with the batch; ``from_store`` measures a method from what was stored. Metrics without
    this side (fidelity to the reference, a domain's metrics) are measured only without a store.
    """

    @classmethod
    @abstractmethod
    def feature_config(cls, config: EvaluateConfig) -> dict | None:
        """What its stored features depend on (a network's fingerprint), or None when it does not apply;
        checked before any model loads, so a missing file fails first."""

    @classmethod
    @abstractmethod
    def extractor(cls, config: EvaluateConfig,
                  device: torch.device) -> Callable[[torch.Tensor, list[str]], dict[str, np.ndarray]]:
        """uint8 images (B, 3, H, W) and their prompts → per-image arrays keyed by stored name."""

    @classmethod
    @abstractmethod
    def from_store(cls, config: EvaluateConfig, store: EvalStore,
                   log: Callable[[str], None]) -> Callable[[str], dict[str, float | None]]:
        """A method name → its row entries, from the stored features (the reference loaded once)."""


def feature_metrics() -> tuple[type, ...]:
    return tuple(m for m in registered_metrics() if issubclass(m, FeatureMetric))


def _stored_stats(store: EvalStore, method: str, feature: str) -> features.GaussianStats:
    return features.gaussian_stats(store.feature_chunks(method, feature))


class InceptionFID(Metric, FeatureMetric):
    """FID with the user's local Inception weights (real SD teachers), torchmetrics' statistics: to
    the real images of ``--fid-reference`` (without it, to the teacher's reference samples), and
    always to the teacher's N·M-step reference samples (distillation's own measure)."""

    name, order = "inception_fid", 20
    columns = (Column("inception_fid", "Inception FID ↓", "{:.2f}"),
               Column("inception_fid_to_teacher", "Inception FID to teacher ↓", "{:.2f}"))
    FEATURE = "inception"

    def __init__(self, net: torch.nn.Module, reference: features.GaussianStats, teacher: features.GaussianStats,
                 note: str):
        self.net, self.reference, self.teacher, self.note = net, reference, teacher, note

    @staticmethod
    def _note(config) -> str:
        data = f"real images in {config.fid_reference}" if config.fid_reference else REFERENCE
        return f"Inception FID vs {data}; FID to teacher vs {REFERENCE}"

    @staticmethod
    def _features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> Iterator[np.ndarray]:
        for i in range(0, images.shape[0], batch_size):
            yield features.image_features(net, images[i:i + batch_size])

    @classmethod
    def create(cls, config, prompts, reference):
        if config.fid_weights is None:
            return None
        net, size = measures.feature_network(config.fid_weights), tuple(reference.images.shape[1:3])
        teacher = features.gaussian_stats(cls._features(net, measures.to_uint8(reference.images)))
        data = (features.reference_stats(config.fid_reference, lambda: net, file_sha256(config.fid_weights), size)
                if config.fid_reference else teacher)
        return cls(net, data, teacher, cls._note(config))

    def measure(self, samples):
        generated = list(self._features(self.net, measures.to_uint8(samples.images)))
        return {"inception_fid": features.frechet_distance(self.reference, generated),
                "inception_fid_to_teacher": features.frechet_distance(self.teacher, generated)}

    @classmethod
    def feature_config(cls, config):
        if config.fid_weights is None:
            return None
        return {"sha256": file_sha256(measures.weights_file(config.fid_weights))}

    @classmethod
    def extractor(cls, config, device):
        net = measures.feature_network(config.fid_weights).to(device)
        return lambda images, prompts: {cls.FEATURE: features.image_features(net, images)}

    @classmethod
    def from_store(cls, config, store, log):
        teacher = _stored_stats(store, REFERENCE, cls.FEATURE)
        if config.fid_reference:
            reference = features.reference_stats(config.fid_reference,
                                                 lambda: measures.feature_network(config.fid_weights), store.schema.metrics[cls.name]["sha256"],
                                                 store.schema.image_size, cache=store.path, log=log)
        else:
            reference = teacher
        return lambda method: {
            "inception_fid": features.frechet_distance(reference, store.feature_chunks(method, cls.FEATURE)),
            "inception_fid_to_teacher": features.frechet_distance(teacher, store.feature_chunks(method, cls.FEATURE))}


class ClipScore(Metric, FeatureMetric):
    """torchmetrics' CLIPScore of each image against its prompt, with a local CLIP model."""

    name, order = "clip_score", 30
    columns = (Column("clip_score", "CLIP score ↑", "{:.2f}"),)
    FEATURE = "clip_score"

    def __init__(self, prompts: list[str], model: str):
        self.prompts, self.model = prompts, model
        self.note = f"CLIP score with {model}"

    @classmethod
    def create(cls, config, prompts, reference):
        return None if config.clip_model is None else cls(prompts, config.clip_model)

    def measure(self, samples):
        return {"clip_score": measures.clip_score(measures.to_uint8(samples.images), self.prompts, self.model)}

    @classmethod
    def feature_config(cls, config):
        return None if config.clip_model is None else {"fingerprint": measures.clip_fingerprint(config.clip_model)}

    @classmethod
    def extractor(cls, config, device):
        model, processor = measures.load_clip(config.clip_model)
        clip = (model.to(device), processor)
        return lambda images, prompts: {cls.FEATURE: measures.clip_scores_per_image(images, prompts, clip).numpy()}

    @classmethod
    def from_store(cls, config, store, log):
        return lambda method: {"clip_score": measures.clip_score_from_terms(
            torch.from_numpy(np.concatenate(list(store.feature_chunks(method, cls.FEATURE)))))}
