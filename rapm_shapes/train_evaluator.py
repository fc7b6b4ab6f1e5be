"""Recipe for the domain evaluator: train the classifier on fresh renders, check it on held-out ones.

Training sees mild blur and noise so that it also reads the slightly soft images a VAE decodes;
the held-out check uses clean renders from a seed the training never used.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rapm_shapes.evaluator import (
    ShapesClassifier, attribute_accuracy, images_from_uint8, predict_attributes, save_evaluator,
)
from rapm_shapes.logbook import Logbook
from rapm_shapes.shapes import ATTRIBUTES, make_dataset

HELD_OUT_SEED_OFFSET = 1_000_003  # held-out renders come from a seed disjoint from training's


def _labels(attrs: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([values.index(a[k]) for a in attrs]) for k, values in ATTRIBUTES.items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    mix = torch.rand(b, 1, 1, 1, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    x = torch.lerp(x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), mix)
    return x + torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(b, 1, 1, 1, generator=gen)


def train_evaluator(out_dir: str | Path, *, seed: int = 0, n_train: int = 30000, n_val: int = 2000,
                    steps: int = 3000, batch_size: int = 128, lr: float = 2e-3, width: int = 32,
                    feature_dim: int = 128, log_every: int = 100) -> dict[str, float]:
    """Train, save weights + config to ``out_dir``, log to its training_log.jsonl; return held-out accuracy."""
    out_dir = Path(out_dir)
    log = Logbook(out_dir / "training_log.jsonl")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images, attrs = make_dataset(n_train, seed)
    x_train, y_train = images_from_uint8(images), _labels(attrs)
    log.write(event="data", n_train=n_train, render_s=round(time.perf_counter() - t0, 2))

    model = ShapesClassifier(ATTRIBUTES, width, feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t_train = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        logits = model(_augment(x_train[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y_train[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.write(event="train", step=step, loss=round(loss.item(), 5), lr=sched.get_last_lr()[0])
    train_s = time.perf_counter() - t_train

    model.eval()
    val_images, val_attrs = make_dataset(n_val, seed + HELD_OUT_SEED_OFFSET)
    acc = attribute_accuracy(predict_attributes(model, images_from_uint8(val_images)), val_attrs)
    metrics = {f"held_out_accuracy_{k}": v for k, v in acc.items()} | {"n_held_out": n_val, "train_s": round(train_s, 1)}
    log.write(event="held_out", **metrics)
    save_evaluator(model, out_dir)
    return metrics
