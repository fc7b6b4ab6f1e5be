"""``rapm store inspect|show``: look into a trajectory store without writing code.

``inspect`` prints what ``storage.trajectory_store.inspect_store`` reports. ``show`` decodes one
stored trajectory through the teacher's VAE: at every slot boundary the position and the x̂0 the
teacher predicted there (solved from two consecutive stored positions; no UNet call), as one
labelled PNG strip.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from rapm_core.schedule import SlotGrid, inference_scheduler
from rapm_core.teacher import decode_latents, load_vae, resolve_device
from rapm_core.trajectory import slot_boundaries
from storage.errors import StoreError
from storage.trajectory_store import TrajectoryStore, inspect_store

LABEL_HEIGHT = 14
MIN_TILE = 128  # small decoded images are upscaled (nearest) to at least this for readable strips


def register(subparsers) -> None:
    parser = subparsers.add_parser("store", help="inspect a trajectory store, or render one trajectory")
    sub = parser.add_subparsers(dest="store_command", required=True)
    p = sub.add_parser("inspect", help="schema, teacher, N, M, guidance, shapes, progress, size, sample prompts")
    p.add_argument("path", metavar="PATH", help="trajectory store")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("show", help="decode one trajectory's slot boundaries and x̂0s into a PNG strip")
    p.add_argument("path", metavar="PATH", help="trajectory store")
    p.add_argument("--index", type=int, required=True, help="trajectory index")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--teacher", default=None, help="teacher to take the VAE from (default: the one the store records)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="decode device")
    p.set_defaults(func=_show)


def _inspect(args) -> int:
    facts = inspect_store(args.path)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for key, value in facts.items():
        if key == "shapes":
            value = ", ".join(f"{k} {tuple(v)}" for k, v in value.items())
        elif key == "sample_prompts":
            value = " | ".join(value)
        print(f"{key:>24}: {value}")
    return 0


def strip_size(num_slots: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the PNG ``show`` writes: N+1 columns, rows "position" and "x̂0"."""
    scale = max(1, math.ceil(MIN_TILE / max(image_hw)))
    h, w = image_hw[0] * scale, image_hw[1] * scale
    return (num_slots + 1) * w, 2 * (LABEL_HEIGHT + h)


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


def _show(args) -> int:
    store = TrajectoryStore(args.path)
    if args.index not in set(store.complete_indices().tolist()):
        raise StoreError(f"{args.path}: trajectory {args.index} is not complete (or out of range [0, {store.num}))")
    attrs, record = store.attrs, store.read(args.index)
    grid = SlotGrid.from_scheduler(attrs["scheduler_config"], attrs["num_slots"], attrs["steps_per_slot"])
    alphas_cumprod = inference_scheduler(attrs["scheduler_config"]).alphas_cumprod
    positions = torch.from_numpy(record["positions"].astype(np.float32))
    at_boundaries, x0 = slot_boundaries(positions, grid, alphas_cumprod)
    vae = load_vae(args.teacher or attrs["teacher"], None if args.teacher else attrs["teacher_revision"],
                   torch.float32, resolve_device(args.device))
    images = decode_latents(vae, torch.cat([at_boundaries, x0])).numpy()
    n, m = grid.num_slots, grid.steps_per_slot
    times = [*grid.coarse, -1]
    top = [(f"Z[{n_ * m}] t={times[n_]}", images[n_]) for n_ in range(n + 1)]
    bottom = [(f"x0_hat t={times[n_]}", images[n + 1 + n_]) for n_ in range(n)] + [("(end)", None)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    render_strip([top, bottom]).save(args.out)
    print(f"{args.out}: trajectory {args.index} ({record['prompt']!r}), {n + 1} slot boundaries")
    return 0
