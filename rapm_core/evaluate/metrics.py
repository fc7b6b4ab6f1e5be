"""Metrics behind one small interface, listed once: the ``rapm.metrics`` entry points.

A metric is a class: ``create`` decides from the evaluation config and its prompts whether it
applies (and loads what it needs, e.g. a feature network, real images), ``measure`` scores one
method's samples, and ``columns`` say how the report shows its numbers. The evaluation engine,
the report, the table artifact and the CLI print all read the registered metrics, so a new
metric is one class and one line under ``[project.entry-points."rapm.metrics"]`` in
pyproject.toml. General metrics live here; a domain's own (the shapes domain's FID and prompt
adherence) live in its package, so this one does not depend on any domain.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from rapm_core.errors import ConfigError
from rapm_core.evaluate import measures
from rapm_core.evaluate.config import REFERENCE, EvaluateConfig
from rapm_core.evaluate.samplers import MethodSamples

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
    def create(cls, config: EvaluateConfig, prompts: list[str], reference: MethodSamples) -> "Metric | None":
        """This metric for one evaluation (``prompts``: one per image), or None if it does not apply."""

    @abstractmethod
    def measure(self, samples: MethodSamples) -> dict[str, float | None]:
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
    Column("images_per_second", "images / s", "{:.2f}"),
    Column("distill_seconds", "distillation wall time (s)", "{:.0f}", chart=False),
)


def table_columns() -> list[Column]:
    """Every column a metrics table can have, in order; the label first."""
    return [Column("label", "method", "{}", chart=False), *(c for m in registered_metrics() for c in m.columns),
            *FACT_COLUMNS]


class Fidelity(Metric):
    """Distance to the reference sample from the same noise: latent MSE and image PSNR (range 1)."""

    name, order, distribution = "fidelity", 40, False
    columns = (Column("latent_mse", "latent MSE to ref ↓", "{:.4f}"), Column("psnr", "PSNR to ref (dB) ↑", "{:.2f}"))

    def __init__(self, reference: MethodSamples):
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


def load_reference_images(folder: str, size: tuple[int, int]) -> torch.Tensor:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ConfigError(f"{folder}: need at least 2 real images (png/jpg/webp) for Inception FID")
    arrays = [np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class InceptionFID(Metric):
    """torchmetrics' FID with the user's local Inception weights (real SD teachers)."""

    name, order = "inception_fid", 20
    columns = (Column("inception_fid", "Inception FID ↓", "{:.2f}"),)

    def __init__(self, real: torch.Tensor, weights: str, note: str):
        self.real, self.weights, self.note = real, weights, note

    @classmethod
    def create(cls, config, prompts, reference):
        if config.fid_weights is None:
            return None
        size = tuple(reference.images.shape[1:3])
        if config.fid_reference:
            return cls(load_reference_images(config.fid_reference, size), config.fid_weights,
                       f"Inception FID vs real images in {config.fid_reference}")
        return cls(measures.to_uint8(reference.images), config.fid_weights, f"Inception FID vs {REFERENCE}")

    def measure(self, samples):
        return {"inception_fid": measures.frechet_inception_distance(self.real, measures.to_uint8(samples.images),
                                                                     self.weights)}


class ClipScore(Metric):
    """torchmetrics' CLIPScore of each image against its prompt, with a local CLIP model."""

    name, order = "clip_score", 30
    columns = (Column("clip_score", "CLIP score ↑", "{:.2f}"),)

    def __init__(self, prompts: list[str], model: str):
        self.prompts, self.model = prompts, model
        self.note = f"CLIP score with {model}"

    @classmethod
    def create(cls, config, prompts, reference):
        return None if config.clip_model is None else cls(prompts, config.clip_model)

    def measure(self, samples):
        return {"clip_score": measures.clip_score(measures.to_uint8(samples.images), self.prompts, self.model)}
