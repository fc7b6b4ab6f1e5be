"""Loss curves of a distillation run, as a PNG beside its metrics.

Adversarial losses are noisy at batch size 1, so each curve is drawn faint as logged with a
running mean on top; adversarial, pointwise, discriminator and gradient-norm series get separate
panels because their scales differ by orders of magnitude.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


# Metric names of ``Distiller.train_step`` → panel.
PANELS = (
    ("generator: adversarial", lambda k: k.endswith("_adv")),
    ("generator: pointwise", lambda k: k.endswith("_pointwise")),
    ("discriminator: hinge loss", lambda k: k.startswith("d_loss")),
    ("discriminator: accuracy", lambda k: k.startswith("d_acc")),
    ("total objective, gradient norms", lambda k: k == "total" or k.startswith("grad_norm")),
)


def plot_loss_curves(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Plot the metrics.jsonl ``rows`` matched by ``PANELS`` against iteration, one panel per group."""
    out = Path(out)
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    panels = [(name, [k for k in keys if match(k)]) for name, match in PANELS]
    panels = [(name, series) for name, series in panels if series] or [("no losses logged yet", [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    window = max(1, len(rows) // 20)
    for ax, (name, series) in zip(axes[:, 0], panels):
        for k in series:
            pts = [(r["iteration"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if not pts:
                continue
            xs, ys = zip(*pts)
            line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            ax.plot(xs, _running_mean(list(ys), window), color=line.get_color(), label=k)
        ax.set_title(name, fontsize=9)
        if series:
            ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
