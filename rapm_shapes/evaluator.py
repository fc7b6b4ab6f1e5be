"""The domain evaluator: a small CNN that reads every attribute of a shapes image.

It is the benchmark's judge. Prompt adherence asks it whether a generated image shows all that
its prompt names; domain FID compares its penultimate features of generated and real images
(the MNIST-FID practice: a network that knows the domain instead of Inception, which needs
downloaded weights and knows nothing about 32×32 shapes). Images are float (B, 3, H, W) in
[-1, 1], the convention a VAE decodes to.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rapm_shapes.shapes import ATTRIBUTES, parse_caption
from rapm_core.errors import ConfigError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class ShapesClassifier(nn.Module):
    """Three conv stages (32→16→8→4) and a feature layer that keeps where things are, then one
    linear head per attribute."""

    def __init__(self, attributes: dict[str, tuple[str, ...]] = ATTRIBUTES, width: int = 32,
                 feature_dim: int = 128, resolution: int = 32):
        super().__init__()
        self.attributes = {k: tuple(v) for k, v in attributes.items()}
        self.config = {"attributes": {k: list(v) for k, v in self.attributes.items()}, "width": width,
                       "feature_dim": feature_dim, "resolution": resolution}

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.trunk = nn.Sequential(*stage(3, width), *stage(width, 2 * width), *stage(2 * width, 2 * width),
                                   nn.Flatten(), nn.Linear(2 * width * (resolution // 8) ** 2, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.attributes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}


def images_from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] → (B, H, W, 3) uint8 (for saving pictures)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_evaluator(model: ShapesClassifier, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")
    return directory


def load_evaluator(directory: str | Path) -> ShapesClassifier:
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
        raise ConfigError(f"{directory} is not an evaluator directory (needs {WEIGHTS} and {CONFIG})")
    cfg = json.loads((directory / CONFIG).read_text())
    model = ShapesClassifier({k: tuple(v) for k, v in cfg["attributes"].items()}, cfg["width"],
                             cfg["feature_dim"], cfg["resolution"])
    model.load_state_dict(load_file(directory / WEIGHTS))
    return model.eval()


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size].float()


@torch.no_grad()
def predict_attributes(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
    model.eval()
    out: list[dict[str, str]] = []
    for batch in _batches(images, batch_size):
        logits = model(batch)
        idx = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
        out += [{k: model.attributes[k][idx[k][i]] for k in logits} for i in range(batch.shape[0])]
    return out


@torch.no_grad()
def features(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(b) for b in _batches(images, batch_size)]).double()


def attribute_accuracy(predicted: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy and ``all`` (every attribute right at once)."""
    n = len(truth)
    acc = {k: sum(p[k] == t[k] for p, t in zip(predicted, truth)) / n for k in truth[0]}
    acc["all"] = sum(all(p[k] == t[k] for k in t) for p, t in zip(predicted, truth)) / n
    return acc


def prompt_adherence(model: ShapesClassifier, images: torch.Tensor, prompts: list[str]) -> float:
    """Share of images whose predicted attributes all match what their prompt names."""
    if len(prompts) != images.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return attribute_accuracy(predict_attributes(model, images), [parse_caption(p) for p in prompts])["all"]
