"""The evaluation report: an image grid, a metrics bar chart, a trajectory figure and report.md
linking them under the metrics table. Headless (Agg) so it renders on servers and in workers.

The same markdown table serves report.md, the Prefect table/markdown artifacts and the CLI print,
so what a person reads anywhere is one rendering of metrics.json.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Sequence

import matplotlib
import torch

from rapm_core.evaluate.metrics import Column, table_columns

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return fmt.format(value).replace("|", "&#124;")


def present_columns(rows: Sequence[dict]) -> list[Column]:
    """The label plus every column some row has a value for (a tiny teacher has no domain FID…)."""
    return [c for c in table_columns() if c.key == "label" or any(r.get(c.key) is not None for r in rows)]


def metrics_table_markdown(rows: Sequence[dict]) -> str:
    columns = present_columns(rows)
    lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r, c.key, c.fmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def table_artifact_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows as Prefect's table artifact shows them: formatted strings under readable titles."""
    columns = present_columns(rows)
    return [{c.title: _cell(r, c.key, c.fmt) for c in columns} for r in rows]


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def image_grid(columns: dict[str, torch.Tensor], row_labels: Sequence[str], out: str | Path) -> Path:
    """Rows = prompts, columns = samplers; ``columns`` maps a sampler label to (R, H, W, 3) images in [0, 1]."""
    labels = list(columns)
    rows = len(row_labels)
    fig, axes = plt.subplots(rows, len(labels), figsize=(1.6 * len(labels) + 2.2, 1.6 * rows), squeeze=False)
    for j, label in enumerate(labels):
        for i in range(rows):
            ax = axes[i, j]
            ax.imshow(columns[label][i].clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=6, rotation=0, ha="right", va="center", wrap=True)
    fig.tight_layout()
    return _save(fig, Path(out))


def metrics_bar_chart(rows: Sequence[dict], out: str | Path) -> Path:
    """One panel per metric present, one bar per sampler."""
    charted = [c for c in present_columns(rows) if c.chart]
    keys, titles = [c.key for c in charted], {c.key: c.title for c in charted}
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    names = [r["sampler"] for r in rows]
    colours = plt.get_cmap("tab10").colors
    for ax, key in zip(axes.flat, keys):
        values = [r.get(key) for r in rows]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(range(len(rows)), heights, color=[colours[i % 10] for i in range(len(rows))])
        for bar, v in zip(bars, values):
            text = "—" if v is None or not math.isfinite(v) else f"{v:.3g}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(titles[key], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(out))


def plot_trajectories(teacher: torch.Tensor, student: torch.Tensor, prompts: Sequence[str],
                      times: Sequence[int], out: str | Path) -> Path:
    """Decoded positions at the slot boundaries, teacher (stored) above student (its own chain),
    one pair of rows per prompt; ``teacher``/``student`` are (P, N+1, H, W, 3) in [0, 1]."""
    p, cols = teacher.shape[0], teacher.shape[1]
    fig, axes = plt.subplots(2 * p, cols, figsize=(1.5 * cols + 2.0, 1.5 * 2 * p), squeeze=False)
    for i in range(p):
        for r, (who, images) in enumerate((("teacher", teacher), ("student", student))):
            for j in range(cols):
                ax = axes[2 * i + r, j]
                ax.imshow(images[i, j].clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and r == 0:
                    ax.set_title("noise" if j == 0 else f"slot end t={times[j]}", fontsize=7)
                if j == 0:
                    label = f"{who}\n{prompts[i]}" if r == 0 else who
                    ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return _save(fig, Path(out))


def report_markdown(title: str, rows: Sequence[dict], facts: Sequence[tuple[str, str]], notes: Sequence[str]) -> str:
    """report.md: facts about the run, the metrics table, notes, then the three figures."""
    lines = [f"# {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), "",
             "## Metrics", "", metrics_table_markdown(rows), ""]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += ["## Samples (same prompt and noise in every row)", "", "![samples](grid.png)", "",
              "## Metrics chart", "", "![metrics](metrics.png)", "",
              "## Trajectories at the slot boundaries (stored teacher vs the student's own chain)", "",
              "![trajectories](trajectory.png)", ""]
    return "\n".join(lines)


def inline_images(markdown: str, folder: str | Path) -> str:
    """Embed the report's local PNG links as data URIs.

    The Prefect server serves no files from the run dir, so a markdown artifact linking
    ``grid.png`` shows broken images in the UI; data URIs render there (checked with the UI's
    screenshot). ``report.md`` on disk keeps its relative links.
    """
    folder = Path(folder)

    def embed(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)/:]+\.png)\)", embed, markdown)
