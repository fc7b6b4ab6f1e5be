"""Clean latents from real images, for the peers' ``--x0-source renders``: as PCM and LCM-LoRA are
published, they distil on real images encoded by the VAE, not on the teacher's own samples.

No real images ship with a prompt file, so a domain that can render its prompts provides them:
the ``rapm.renderers`` entry points (the shapes domain's renderer is one). Each trajectory gets
one render of its prompt, seeded by the trajectory's own seed, encoded once at the run's start
(a sample of the VAE posterior drawn from that seed), so a resumed run sees the same latents.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol

import numpy as np
import torch

from rapm_core.errors import ConfigError
from rapm_core.teacher import load_vae
from storage.trajectory_store import TrajectoryStore

ENTRY_POINT_GROUP = "rapm.renderers"


class Renderer(Protocol):
    name: str

    def applies(self, prompts: list[str]) -> bool:
        """Whether it can render every one of these prompts."""

    def render(self, prompts: list[str], seeds: list[int], resolution: int) -> np.ndarray:
        """uint8 images (B, H, W, 3), image i drawn from ``seeds[i]`` alone."""


def find_renderer(prompts: list[str]) -> Renderer:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        renderer = ep.load()()
        if renderer.applies(prompts):
            return renderer
    raise ConfigError("--x0-source renders needs a renderer for these prompts (the shapes domain has one); "
                      "use --x0-source store")


@torch.no_grad()
def render_latents(store: TrajectoryStore, indices: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """Trajectory index → (1, C, H, W) latents of a real render of its prompt."""
    schema = store.schema
    prompts, seeds = store.prompts(), store.seeds()
    wanted = [prompts[i] for i in indices]
    renderer = find_renderer(wanted)
    vae = load_vae(schema.teacher, schema.teacher_revision, torch.float32, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = schema.latent_shape[-1] * factor
    latents = {}
    for i in indices:
        image = renderer.render([prompts[i]], [seeds[i]], resolution)
        x = torch.from_numpy(image).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(seeds[i]))
        z = posterior.mean + posterior.std * noise.to(device)
        latents[i] = (z * vae.config.scaling_factor).float().cpu()
    return latents
