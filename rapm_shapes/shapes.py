"""The "shapes" domain: one jittered shape on a plain background, captioned from its attributes.

Every image is a pure function of its attributes and a numpy generator, so ground truth is
infinite and exact. The jitter (place, size, hue, saturation, rotation, background brightness)
gives the distribution real variance, which a Fréchet distance needs to mean anything.
"""

from __future__ import annotations

import colorsys
import itertools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rapm_core.errors import ConfigError
from storage.atomic import write_text_atomic

RESOLUTION = 32
_SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges without a raster library

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "yellow", "green", "blue")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}

_HUE_DEG = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 230.0}
_HALF_EXTENT = {"small": 4.0, "large": 8.0}  # pixels at 32×32
_CENTRE = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
_TEMPLATE = "a {size} {colour} {shape} at the {position}"


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    return {name: str(values[rng.integers(len(values))]) for name, values in ATTRIBUTES.items()}


def caption(attrs: dict[str, str]) -> str:
    return _TEMPLATE.format(**attrs)


def parse_caption(text: str) -> dict[str, str]:
    """Attributes named in ``text``: exactly one word of each attribute's vocabulary."""
    words = text.lower().replace(",", " ").split()
    attrs = {}
    for name, values in ATTRIBUTES.items():
        found = [w for w in words if w in values]
        if len(found) != 1:
            raise ConfigError(f"prompt {text!r} does not name exactly one {name} of {', '.join(values)}")
        attrs[name] = found[0]
    return attrs


def all_prompts() -> list[str]:
    """Every attribute combination's caption, in a fixed order."""
    return [caption(dict(zip(ATTRIBUTES, combo))) for combo in itertools.product(*ATTRIBUTES.values())]


def vocabulary() -> list[str]:
    """Every word any caption uses, in first-use order (what the teacher's tokenizer knows)."""
    words: list[str] = []
    for prompt in all_prompts():
        words += [w for w in prompt.split() if w not in words]
    return words


def _shape_points(shape: str, cx: float, cy: float, half: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        r, start, n = half * math.sqrt(2) * 0.9, math.pi / 4, 4
    else:  # triangle, pointing up, circumradius chosen so its area is close to the square's
        r, start, n = half * 1.25, -math.pi / 2, 3
    return [(cx + r * math.cos(start + angle + 2 * math.pi * k / n), cy + r * math.sin(start + angle + 2 * math.pi * k / n))
            for k in range(n)]


def render(attrs: dict[str, str], rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image of ``attrs`` with fresh jitter drawn from ``rng``."""
    scale = resolution / RESOLUTION * _SUPERSAMPLE
    hue = (_HUE_DEG[attrs["colour"]] + rng.uniform(-10, 10)) % 360 / 360
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    fill = tuple(int(round(255 * c)) for c in rgb)
    background = int(round(255 * rng.uniform(0.08, 0.25)))
    fx, fy = _CENTRE[attrs["position"]]
    cx = (fx * RESOLUTION + rng.uniform(-1.5, 1.5)) * scale
    cy = (fy * RESOLUTION + rng.uniform(-1.5, 1.5)) * scale
    half = _HALF_EXTENT[attrs["size"]] * rng.uniform(0.85, 1.15) * scale
    angle = math.radians(rng.uniform(-15, 15))

    size = resolution * _SUPERSAMPLE
    canvas = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    if attrs["shape"] == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon(_shape_points(attrs["shape"], cx, cy, half, angle), fill=fill)
    return np.asarray(canvas.resize((resolution, resolution), Image.BOX), dtype=np.uint8)


def render_prompts(prompts: list[str], seed: int, resolution: int = RESOLUTION) -> np.ndarray:
    """Real renders for ``prompts`` (the reference set a domain FID compares generations to)."""
    return np.stack([render(parse_caption(p), np.random.default_rng([seed, i]), resolution) for i, p in enumerate(prompts)])


def make_dataset(n: int, seed: int, resolution: int = RESOLUTION) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` renders (uint8, N×H×W×3) with their attributes; item i depends only on (seed, i)."""
    attrs, images = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        a = sample_attributes(rng)
        attrs.append(a)
        images.append(render(a, rng, resolution))
    return np.stack(images), attrs


def write_builtin_prompts(path: Path) -> None:
    """Every shapes caption, one a line; rewritten only if different, so the ingest stays complete."""
    text = "\n".join(all_prompts()) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
