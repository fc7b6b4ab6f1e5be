"""The shapes domain's metrics: domain FID and prompt adherence, judged by the shapes evaluator.

Registered as the ``shapes`` entry point of ``rapm.metrics``. It applies when the evaluation
names an evaluator directory, or with ``evaluator=auto`` when every prompt is a shapes caption
and the embedded evaluator is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rapm_core.errors import ConfigError
from rapm_core.evaluate.features import frechet_distance, gaussian_stats
from rapm_core.evaluate.measures import kernel_distance, knn_precision_recall, to_uint8
from rapm_core.evaluate.metrics import Column, Metric
from rapm_core.evaluate.samplers import SamplerSamples
from rapm_shapes import evaluator as judge
from rapm_shapes.assets import EMBEDDED_EVALUATOR
from rapm_shapes.shapes import parse_caption, render_prompts


NEIGHBOURS = 3  # Kynkäänniemi et al.'s k


def evaluator_images(images: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, H, W, 3) in [0, 1] → the evaluator's input, quantised to uint8 on the way
    as the real renders are, so neither side is favoured by precision."""
    return to_uint8(images).float() / 127.5 - 1.0


def resolve_evaluator(evaluator: str, prompts: list[str]) -> Path | None:
    if evaluator == "none":
        return None
    if evaluator != "auto":
        return Path(evaluator)
    try:
        for p in prompts:
            parse_caption(p)
    except ConfigError:
        return None
    return EMBEDDED_EVALUATOR if (EMBEDDED_EVALUATOR / "config.json").is_file() else None


class JudgeFeatures(torch.nn.Module):
    """The evaluator's penultimate features of uint8 images (B, 3, H, W), divided by ``scale``: the
    feature network that torchmetrics' KID runs. KID's cubic kernel (x·y/D + 1)³ expects x·y/D of
    order one, as Inception features give; the classifier's are larger, so the real set's RMS
    feature size (fixed per evaluation) sets the scale."""

    def __init__(self, model: judge.ShapesClassifier, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return judge.features(self.model, images.float() / 127.5 - 1.0) / self.scale


class ShapesDomain(Metric):
    name, order = "shapes", 10
    columns = (Column("domain_fid", "domain FID ↓", "{:.2f}"),
               Column("domain_fid_to_teacher", "domain FID to teacher ↓", "{:.2f}"),
               Column("domain_kid", "domain KID ↓", "{:.4f}"),
               Column("domain_recall", "recall ↑", "{:.3f}"), Column("domain_precision", "precision ↑", "{:.3f}"),
               Column("domain_coverage", "coverage ↑", "{:.3f}", chart=False),
               Column("prompt_adherence", "prompt adherence ↑", "{:.1%}"))

    def __init__(self, model: judge.ShapesClassifier, prompts: list[str], renders: np.ndarray, name: str,
                 reference: SamplerSamples | None):
        self.model, self.prompts = model, prompts
        self.real_uint8 = torch.from_numpy(renders).permute(0, 3, 1, 2).contiguous()
        self.real_features = judge.features(model, judge.images_from_uint8(renders))
        self.real_stats = gaussian_stats([self.real_features])
        # distillation's own measure: the same features, the teacher's N·M-step samples as the reference set
        self.teacher_stats = None if reference is None else gaussian_stats(
            [judge.features(model, self._judge_input(reference.images))])
        self.kid_features = JudgeFeatures(model, float(self.real_features.pow(2).mean().sqrt()))
        self.note = (f"domain FID, KID (unbiased), k-NN precision/recall/coverage (k = {NEIGHBOURS}): evaluator "
                     f"features of each sampler's images vs real renders of the same prompts ({name}); domain FID to "
                     f"teacher: the same features vs the teacher's N·M-step reference samples; prompt "
                     f"adherence: share with every attribute right")

    @classmethod
    def create(cls, config, prompts, reference):
        directory = resolve_evaluator(config.evaluator, prompts)
        if directory is None:
            return None
        model = judge.load_evaluator(directory)
        renders = np.asarray(render_prompts(prompts, config.render_seed, model.config["resolution"]))
        return cls(model, prompts, renders, directory.name, reference)

    def _judge_input(self, images: torch.Tensor) -> torch.Tensor:
        x = evaluator_images(images)
        resolution = self.model.config["resolution"]
        if tuple(x.shape[-2:]) != (resolution, resolution):
            raise ConfigError(f"the shapes evaluator reads {resolution}×{resolution} images; this teacher makes "
                              f"{x.shape[-1]}×{x.shape[-2]} (pass --evaluator none)")
        return x

    def measure(self, samples: SamplerSamples) -> dict[str, float | None]:
        x = self._judge_input(samples.images)
        fake = judge.features(self.model, x)
        knn = knn_precision_recall(self.real_features, fake, NEIGHBOURS)
        to_teacher = None if self.teacher_stats is None else frechet_distance(self.teacher_stats, [fake])
        return {"domain_fid": frechet_distance(self.real_stats, [fake]), "domain_fid_to_teacher": to_teacher,
                "domain_kid": kernel_distance(self.real_uint8, to_uint8(samples.images), self.kid_features),
                "domain_recall": knn["recall"], "domain_precision": knn["precision"],
                "domain_coverage": knn["coverage"], "prompt_adherence": judge.prompt_adherence(self.model, x, self.prompts)}
