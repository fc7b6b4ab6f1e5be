"""A picture of one stored trajectory: at every slot boundary the position and the x̂0 the teacher
predicted there (solved from two consecutive stored positions; no UNet call), decoded through
the teacher's VAE into one labelled PNG strip (``rapm store show``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from rapm_core.ode import SlotGrid
from rapm_core.teacher import decode_latents, load_vae
from rapm_core.trajectories.chain import boundary_x0
from storage.errors import StoreError
from storage.trajectory_store import TrajectoryStore

LABEL_HEIGHT = 14
MIN_TILE = 128  # small decoded images are upscaled (nearest) to at least this for readable strips


def render_strip(rows: list[list[tuple[str, np.ndarray | None]]]) -> Image.Image:
    """Labelled grid of (label, HxWx3 float image in [0, 1] or None for an empty cell)."""
    first = next(img for row in rows for _, img in row if img is not None)
    scale = max(1, math.ceil(MIN_TILE / max(first.shape[:2])))
    h, w = first.shape[0] * scale, first.shape[1] * scale
    canvas = Image.new("RGB", (len(rows[0]) * w, len(rows) * (LABEL_HEIGHT + h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (LABEL_HEIGHT + h)
        for c, (label, img) in enumerate(row):
            draw.text((c * w + 2, y + 1), label, fill="black")
            if img is None:
                draw.rectangle([c * w, y + LABEL_HEIGHT, (c + 1) * w - 1, y + LABEL_HEIGHT + h - 1], fill="lightgrey")
                continue
            tile = Image.fromarray((img * 255).round().astype(np.uint8)).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (c * w, y + LABEL_HEIGHT))
    return canvas


def trajectory_strip(store: TrajectoryStore, index: int, device: torch.device,
                     teacher: str | None = None) -> tuple[Image.Image, str]:
    """The strip of trajectory ``index`` and its prompt; the VAE from ``teacher`` or the store's."""
    if index not in set(store.complete_indices().tolist()):
        raise StoreError(f"{store.path}: trajectory {index} is not complete (or out of range [0, {store.num}))")
    schema, record = store.schema, store.read(index)
    grid = SlotGrid.from_scheduler(schema.scheduler_config, schema.num_slots, schema.steps_per_slot)
    positions = torch.from_numpy(record.positions.astype(np.float32))
    x0 = boundary_x0(positions, grid)
    vae = load_vae(teacher or schema.teacher, None if teacher else schema.teacher_revision, torch.float32, device)
    images = decode_latents(vae, torch.cat([positions[grid.boundary_indices()], x0])).numpy()
    n, times, ks = grid.num_slots, grid.boundary_times(), grid.boundary_indices()
    top = [(f"Z[{ks[j]}] t={times[j]}", images[j]) for j in range(n + 1)]
    bottom = [(f"x0_hat t={times[j]}", images[n + 1 + j]) for j in range(n)] + [("(end)", None)]
    return render_strip([top, bottom]), record.prompt
