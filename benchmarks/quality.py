"""Quality benchmark: the full comparison on the embedded default, and the ablation of RAPM.md.

One prompt store and one trajectory store (the embedded teacher, the built-in shapes captions)
serve every variant. Each variant distils its own student with the real loop
(``flows.distill.run_distillation``) and is evaluated by the real evaluation stage
(``flows.evaluate.evaluate_run``) on the same held-out prompts and the same initial noise, so the
teacher rows of every variant are identical and the student rows compare like with like.

Variants (each changes one thing from the base method — ``--method`` over DistillConfig's
defaults — except the loss-kind rows, which set both losses alike; a variant that would not
change the base is left out, its row is the base's):

- relative only / absolute only / both — which position is matched;
- adversarial / pointwise / adversarial + pointwise — how it is matched;
- d = 0, 1, 4 — fine steps into the slot for the relative target;
- rank 1, 4 — LoRA rank; lr 1e-4, 1e-3, 3e-3 — the LoRA's learning rate.

The script writes the tables into the ``## Quality`` section of ``benchmarks/RESULTS.md`` with
the machine, the command and the date, and prints them. Variants run in parallel processes
(``--jobs``), one torch thread each.

Run: ``.venv/bin/python benchmarks/quality.py`` (defaults below; about an hour on 2 CPU cores),
or e.g. ``--iterations 20 --num-images 24 --variants default losses-pointwise --no-write`` to try it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import re
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from flows.distill import run_distillation  # noqa: E402
from flows.evaluate import evaluate_run  # noqa: E402
from flows.pipeline import (  # noqa: E402
    PipelineConfig, distill_config, evaluate_config, ingest_config, prepare, trajectories_config,
)
from flows.trajectories import generate_trajectories  # noqa: E402
from rapm_core.distill import DistillConfig  # noqa: E402
from storage.prompt_sources import ingest_prompts  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Quality"
ALL_LOSSES = ("adversarial", "pointwise", "both")

# name → (what it tests, DistillConfig overrides on top of the benchmark's base method)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("the base method", {}),
    "relative-only": ("ℓ_rel only", {"loss_absolute": "off"}),
    "absolute-only": ("ℓ_abs only", {"loss_relative": "off"}),
    **{f"losses-{kind}": (f"both positions, {kind}", {"loss_relative": kind, "loss_absolute": kind})
       for kind in ALL_LOSSES},
    "d0": ("d = 0", {"relative_offset": 0}),
    "d1": ("d = 1", {"relative_offset": 1}),
    "d4": ("d = 4", {"relative_offset": 4}),
    "rank1": ("LoRA rank 1", {"rank": 1}),
    "rank4": ("LoRA rank 4", {"rank": 4}),
    "lr1e-4": ("lr 1e-4", {"lr": 1e-4}),
    "lr1e-3": ("lr 1e-3", {"lr": 1e-3}),
    "lr3e-3": ("lr 3e-3", {"lr": 3e-3}),
}
TABLE_KEYS = ("domain_fid", "prompt_adherence", "latent_mse", "psnr", "nfe", "images_per_second")


def base_config(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(work=args.work, seed=args.seed, threads=1, eval_fraction=args.eval_fraction,
                          slots=args.slots, steps_per_slot=args.steps_per_slot, guidance=args.guidance,
                          trajectory_batch_size=16, iterations=args.iterations,
                          checkpoint_every=max(1, args.iterations // 3), num_images=args.num_images,
                          eval_batch_size=60, method=DistillConfig(**json.loads(args.method)))


def shared_stages(config: PipelineConfig) -> None:
    """Prompt store and trajectory store, made once (each stage skips itself when complete)."""
    prepare(config)
    ingest_prompts(ingest_config(config))
    generate_trajectories(trajectories_config(config), log=lambda m: None)


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def run_variant(config_json: str, name: str) -> dict:
    """Distil and evaluate one variant in this (child) process; its run dir is WORK/variants/NAME."""
    torch.set_num_threads(1)
    quiet()
    config = PipelineConfig.model_validate_json(config_json)
    overrides = VARIANTS[name][1]
    config = config.model_copy(update={"method": config.method.model_copy(update=overrides)})
    run_dir = Path(config.work) / "variants" / name
    distill = distill_config(config).model_copy(update={"out": str(run_dir)})
    t0 = time.perf_counter()
    result = run_distillation(distill, log=lambda m: None)
    distill_s = time.perf_counter() - t0
    evaluate = evaluate_config(config).model_copy(update={"run": str(run_dir)})
    rows = evaluate_run(evaluate, log=lambda m: None).rows
    return {"name": name, "rows": rows, "distill_s": distill_s, "trained": result.trained,
            "seconds_per_iteration": result.seconds_per_iteration}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def tables(results: list[dict], config: PipelineConfig) -> tuple[str, dict]:
    """Markdown for the comparison and the ablation, and the default config's target check."""
    by_name = {r["name"]: r for r in results}
    first = by_name.get("default", results[0])
    teacher_rows = [row for row in first["rows"] if row["method"] != "student"]
    header = "| method | domain FID | adherence | latent MSE | PSNR | NFE | images/s | distill s |\n|---|---|---|---|---|---|---|---|"

    def line(label: str, row: dict, distill_s: float | None) -> str:
        return f"| {label} | " + " | ".join(_fmt(row.get(k)) for k in TABLE_KEYS) + f" | {_fmt(distill_s)} |"

    def student(r: dict) -> dict:
        return next(row for row in r["rows"] if row["method"] == "student")

    comparison = [header] + [line(row["label"], row, None) for row in teacher_rows]
    comparison.append(line(f"RAPM student ({first['name']})", student(first), first["distill_s"]))
    ablation = [header.replace("| method |", "| variant |")]
    ablation += [line(f"{r['name']}: {VARIANTS[r['name']][0]}", student(r), r["distill_s"]) for r in results]

    ref = next(row for row in teacher_rows if row["method"] == "teacher_ref")
    ddim = next(row for row in teacher_rows if row["method"] == "teacher_ddim")
    s = student(first)
    check = {}
    if "domain_fid" in s:
        check = {
            "student FID / reference FID (≤ 1.3)": s["domain_fid"] / ref["domain_fid"],
            "student FID / 4-step DDIM FID (≤ 0.5)": s["domain_fid"] / ddim["domain_fid"],
            "student adherence / reference adherence (≥ 0.95)": (s["prompt_adherence"] / ref["prompt_adherence"]
                                                                 if ref["prompt_adherence"] else float("nan")),
        }
    return "\n".join(comparison) + "\n\n" + "\n".join(ablation) + "\n", check


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or 'CPU'}, {multiprocessing.cpu_count()} cores, "
            f"torch {torch.__version__}, 1 torch thread per process, "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def write_section(body: str) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    match = re.search(rf"^{re.escape(SECTION)}$", text, flags=re.MULTILINE)  # not "## Quality on …"
    if match:
        head, rest = text[:match.start()], text[match.end():]
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head.rstrip() + "\n\n" + body.rstrip() + "\n" + tail
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/quality", help="work dir (re-run to resume finished variants)")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--num-images", type=int, default=480, help="eval images per method")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--steps-per-slot", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="{}", help="JSON overrides of DistillConfig shared by every variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = parser.parse_args(argv)
    quiet()

    config = base_config(args)
    base = config.method
    variants = [name for name in args.variants
                if name == "default" or base.model_copy(update=VARIANTS[name][1]) != base]
    t0 = time.perf_counter()
    shared_stages(config)
    stores_s = time.perf_counter() - t0
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, config.model_dump_json(), name) for name in variants]
        results = [f.result() for f in futures]
    body, check = tables(results, config)
    command = "`" + shlex.join([".venv/bin/python", "benchmarks/quality.py", *sys.argv[1:]]) + "`"
    verdict = "\n".join(f"- {k}: **{v:.3f}**" for k, v in check.items())
    section = (f"{SECTION}\n\n**Machine.** {machine()}.\n\n**Command.** {command} "
               f"({time.perf_counter() - t0:.0f} s in all; stores {stores_s:.0f} s).\n\n"
               f"**Setup.** Teacher `{config.teacher}`, built-in shapes captions ({args.eval_fraction:.0%} held out "
               f"for evaluation), N = {config.slots} slots × M = {config.steps_per_slot} steps, guidance "
               f"{config.guidance:g}; {config.iterations} iterations per variant at batch size 1; "
               f"{config.num_images} eval images per method from the same noise. Base method: "
               f"`{config.method.model_dump_json(exclude_defaults=True)}` over DistillConfig's defaults.\n\n"
               f"{body}\n**Targets** (default config):\n{verdict}\n")
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
