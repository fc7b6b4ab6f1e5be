"""The shapes domain as a renderer of real images for the peers' ``--x0-source renders``
(the ``shapes`` entry point of ``rapm.renderers``)."""

from __future__ import annotations

import numpy as np

from rapm_core.errors import ConfigError
from rapm_shapes.shapes import parse_caption, render


class ShapesRenderer:
    name = "shapes"

    def applies(self, prompts: list[str]) -> bool:
        try:
            for p in prompts:
                parse_caption(p)
        except ConfigError:
            return False
        return True

    def render(self, prompts: list[str], seeds: list[int], resolution: int) -> np.ndarray:
        return np.stack([render(parse_caption(p), np.random.default_rng(int(s)), resolution)
                         for p, s in zip(prompts, seeds, strict=True)])
