"""What the previews cost: the time one preview grid takes at a checkpoint against the training
time of one checkpoint interval, on the embedded teacher at the demo's settings.

A store of the demo's N, M and guidance on a cut of the built-in prompts (enough eval prompts
for the default preview count), then a short distillation with two checkpoints; the preview
time is read from the run's log, the training time from its metrics.jsonl.

    .venv/bin/python benchmarks/bench_previews.py [--iterations 40] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import torch

from bench_common import machine
from rapm_core.distill.config import DistillOptions
from rapm_core.distill.run import run_distillation
from rapm_core.ingest.engine import ingest_prompts
from rapm_core.trajectories.generate import generate_trajectories
from rapm_shapes.demo import demo_config, write_builtin_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-previews-"))
    demo = demo_config().model_copy(update={"work": str(work)})
    demo = demo.model_validate({**demo.model_dump(), "work": str(work),
                                "ingest": {**demo.ingest.model_dump(), "limit": 40, "eval_fraction": 0.25}})
    torch.set_num_threads(demo.threads or torch.get_num_threads())
    write_builtin_prompts(demo.paths()["source"])
    ingest_prompts(demo.ingest_config())
    generate_trajectories(demo.trajectories_config(), log=lambda _: None)
    config = demo.distill_config().model_copy(update={"iterations": args.iterations,
                                                      "checkpoint_every": args.iterations // 2})
    logged: list[str] = []
    run_distillation(config, log=logged.append)
    previews = [float(m.group(1)) for line in logged if (m := re.search(r"^preview .* \(([\d.]+) s\)$", line))]
    start = next(line for line in logged if line.startswith("previews: "))
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    per_iteration = sum(r["seconds"] for r in rows) / len(rows)
    preview = sum(previews) / len(previews)
    print(machine())
    print(f"N={demo.trajectories.slots} M={demo.trajectories.steps_per_slot}, {config.preview_prompts} preview "
          f"prompts; {start}")
    print(f"training {per_iteration:.3f} s/iteration; a preview {preview:.3f} s (mean of {len(previews)})")
    for name, every in (("demo", demo.distill.checkpoint_every),
                        ("default", DistillOptions.model_fields["checkpoint_every"].default)):
        print(f"checkpoint every {every} ({name}): previews add {100 * preview / (every * per_iteration):.2f} % "
              f"of training time")


if __name__ == "__main__":
    main()
