"""Time curves: RAPM, PCM and LCM-LoRA at equal *total* time, Stage A included, at N = 4 and N = 2,
measured as distillation measures itself: against the teacher.

On the embedded default (shapes teacher, built-in captions), with the quality benchmark's stores
and settings (``quality.shared_stages``: one prompt split, one trajectory store per N, N·M = 32
teacher steps). Stage A is timed here, per N, on an otherwise idle pool. What each method uses
of it: RAPM reads the N+1 stored positions of every trajectory; the peers (``x0_source`` "store",
the data-free setting) read the store's conditioning and its final position x0 — the end of the
same 32-step guided chain, so the same Stage A cost — and call the guided teacher online every
pass instead. Every method is charged its N's Stage A seconds.

Each run distils with the real loop (``run_distillation``), extended to a few checkpoints; at each
its exported student is loaded the stock way and measured on the held-out prompts
(``quality_measure.measure_student``) with the teacher's 32-step reference samples of the same
eval noise: FID to the teacher (evaluator features vs the reference samples), domain FID to real
renders, and latent MSE / image PSNR to the reference from the same noise. Total seconds = Stage A
+ the run's summed iteration seconds (``metrics.jsonl``; checkpoint writes and evaluation are
not counted). The teacher's own N-step samplers are measured the same way, for scale. ``--ranks``
gives RAPM one curve per LoRA rank (``rapm-r4``, …; the default rank keeps the plain name), and
``--peer-ranks`` the peers (``pcm-r4``, …), so that a rank's effect is compared at equal rank.

Writes ``WORK/time_curves.json`` (every point, the command, the machine) and
``benchmarks/time_curves_total_seconds.png``, ``benchmarks/time_curves_passes.png``; with ``--write``,
its section of RESULTS.md (``--report-only`` draws and writes them again from the JSON).
Run: ``.venv/bin/python benchmarks/time_curves.py`` (see ``--help`` for the size; finished runs
are reused from ``--work``, each run dir resumes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from rapm_core.distill.config import MethodConfig, TrainingConfig  # noqa: E402
from rapm_core.distill.run import run_distillation  # noqa: E402
from rapm_core.evaluate.samplers import SamplerSamples  # noqa: E402
from rapm_core.pipeline import PipelineConfig  # noqa: E402

from quality import STEPS, VARIANTS, cell, machine, passes_per_iteration, quiet, shared_stages, write_section  # noqa: E402
from quality_measure import measure_student, measure_teachers, teacher_reference  # noqa: E402

SECTION = "## Time curves: fidelity to the teacher at equal total time, Stage A included"
PNG = {"total_s": "time_curves_total_seconds.png", "passes": "time_curves_passes.png"}
METHODS: dict[str, dict[str, Any]] = {"rapm": {}, "pcm": {"method": "pcm"}, "lcm": {"method": "lcm"},
                                       "pcm-published": VARIANTS["pcm-published"][2]}
DEFAULT_METHODS = ("rapm", "pcm", "lcm")
DEFAULT_RANK = TrainingConfig.model_fields["rank"].default
# (key, title, format): what each point is measured by
MEASURES = (("domain_fid_to_teacher", "FID to teacher ↓", "{:.2f}"), ("domain_fid", "domain FID ↓", "{:.2f}"),
            ("psnr", "PSNR to ref (dB) ↑", "{:.2f}"), ("latent_mse", "latent MSE to ref ↓", "{:.4f}"))


def series(method: str, rank: int = DEFAULT_RANK) -> str:
    """A curve's name: the method, with its LoRA rank where that is not the default (so the default's
    run dirs and points stay those of runs made before ranks could be set)."""
    return method if rank == DEFAULT_RANK else f"{method}-r{rank}"


def series_label(name: str) -> str:
    method, _, rank = name.partition("-r")
    return method.upper() + (f" rank {rank}" if rank else "")


@dataclass
class CurveJob:
    method: str
    n: int
    seed: int
    config_json: str
    passes: int
    points: int
    num_images: int
    reference: SamplerSamples  # the teacher's 32-step samples of this seed's eval noise
    rank: int = DEFAULT_RANK  # the student's LoRA rank (TrainingConfig.rank)

    @property
    def series(self) -> str:
        return series(self.method, self.rank)


def stage_a(work: Path, ns: list[int], args: argparse.Namespace) -> tuple[dict[int, PipelineConfig], dict[int, float]]:
    """The stores per N and the seconds each took (kept in WORK/stage_a.json: a re-run reuses the
    stores, so it keeps the seconds of the run that built them)."""
    record = work / "stage_a.json"
    seconds = {int(k): v for k, v in json.loads(record.read_text()).items()} if record.is_file() else {}
    configs = {}
    for n in ns:
        t0 = time.perf_counter()
        configs.update(shared_stages(work, [n], args))
        seconds.setdefault(n, time.perf_counter() - t0)
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(seconds))
    return configs, seconds


def run_curve(job: CurveJob) -> list[dict[str, Any]]:
    """Distil one method at one N and seed, extended to each point, measuring the student at each."""
    torch.set_num_threads(1)
    quiet()
    config = PipelineConfig.model_validate_json(job.config_json)
    options = METHODS[job.method]
    method = MethodConfig.from_options(**options, init_seed=job.seed, rank=job.rank)
    per_iteration = passes_per_iteration(options, job.n)
    total = max(1, job.passes // per_iteration)
    run_dir = Path(config.work) / "runs" / f"{job.series}-curve-s{job.seed}"
    measured_file = run_dir.parent / f"{run_dir.name}-points-{job.num_images}.json"  # a re-run measures nothing twice
    rows = json.loads(measured_file.read_text()) if measured_file.is_file() else []
    for iterations in sorted({max(1, round(total * k / job.points)) for k in range(1, job.points + 1)}):
        if any(r["iterations"] == iterations for r in rows):
            continue
        distill = config.distill_config().model_copy(update={
            **dict(method), "out": str(run_dir), "seed": job.seed, "iterations": iterations,
            "checkpoint_every": max(1, total // job.points), "keep_checkpoints": 1})
        run_distillation(distill, log=lambda m: None)
        train_s = sum(json.loads(line).get("seconds", 0.0) for line in (run_dir / "metrics.jsonl").open())
        measured = measure_student(config, run_dir, 1000 + job.seed, job.num_images, job.reference)
        rows.append({"method": job.series, "rank": job.rank, "n": job.n, "seed": job.seed, "iterations": iterations,
                     "passes": iterations * per_iteration, "train_s": train_s,
                     **{k: measured[k] for k, _, _ in MEASURES}, "domain_recall": measured["domain_recall"]})
        measured_file.write_text(json.dumps(rows))
    return sorted(rows, key=lambda r: r["iterations"])


# -- report ---------------------------------------------------------------------------------------------
def curves(points: list[dict], x: str) -> dict[tuple[str, int], tuple[list[float], dict[str, list[list[float]]]]]:
    """(method, N) → (x per checkpoint averaged over seeds, measure → per checkpoint the seeds' values)."""
    out = {}
    for key in sorted({(p["method"], p["n"]) for p in points}):
        mine = [p for p in points if (p["method"], p["n"]) == key]
        its = sorted({p["iterations"] for p in mine})
        at = [[p for p in mine if p["iterations"] == i] for i in its]
        out[key] = ([statistics.fmean(p[x] for p in ps) for ps in at],
                    {k: [[p[k] for p in ps] for ps in at] for k, _, _ in MEASURES})
    return out


def plot(points: list[dict], x: str, xlabel: str, out: Path, teachers: dict[int, list[dict]] | None = None) -> None:
    """Three panels (FID to teacher, domain FID, PSNR); the teacher's N-step DDIM as a grey line per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"rapm": "tab:blue", "pcm": "tab:orange", "lcm": "tab:green", "pcm-published": "tab:red",
               "rapm-r4": "tab:purple", "rapm-r16": "tab:brown"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title, _) in zip(axes, MEASURES[:3]):
        for (method, n), (xs, values) in curves(points, x).items():
            means = [statistics.fmean(v) for v in values[key]]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values[key]]
            colour = colours.get(method, "tab:gray")
            ax.plot(xs, means, marker="o", color=colour, linestyle="-" if n == 4 else "--",
                    label=f"{series_label(method)} N = {n}")
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.15)
        for n, per_seed in (teachers or {}).items():
            ddim = [t["teacher_ddim"][key] for t in per_seed if t["teacher_ddim"].get(key) is not None]
            if ddim:
                ax.axhline(statistics.fmean(ddim), color="grey", linestyle="-" if n == 4 else "--", linewidth=1,
                           label=f"teacher DDIM {n} steps")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def names(points: list[dict]) -> list[str]:
    """The curves present, in METHODS' order, each method's ranks ascending after it."""
    present = {(p["method"], p.get("rank", DEFAULT_RANK)) for p in points}
    order = list(METHODS)
    return [name for name, _ in sorted(present, key=lambda nr: (order.index(nr[0].partition("-r")[0]), nr[1]))]


def final_table(points: list[dict], stage_s: dict[int, float], teachers: dict[int, list[dict]]) -> str:
    head = ("| N | method | passes | Stage A s | training s | total s | "
            + " | ".join(t for _, t, _ in MEASURES) + " |")
    lines = [head, "|" + "---|" * (6 + len(MEASURES))]
    for n in sorted(teachers, reverse=True):  # the Ns of this run (the stores may hold more)
        for m, spec in teachers[n][0].items():
            lines.append(f"| {n} | {spec['label']} | – | – | – | – | "
                         + " | ".join("–" if spec.get(k) is None else cell([t[m][k] for t in teachers[n]], f)
                                      for k, _, f in MEASURES) + " |")
        for method in names(points):
            mine = [p for p in points if p["method"] == method and p["n"] == n]
            if not mine:
                continue
            last = max(p["iterations"] for p in mine)
            ps = [p for p in mine if p["iterations"] == last]
            train = statistics.fmean(p["train_s"] for p in ps)
            lines.append(f"| {n} | {series_label(method)} | {ps[0]['passes']} | {stage_s[n]:.0f} | {train:.0f} | "
                         f"{stage_s[n] + train:.0f} | " + " | ".join(cell([p[k] for p in ps], f) for k, _, f in MEASURES)
                         + " |")
    return "\n".join(lines)


def equal_time(points: list[dict]) -> str:
    """Per N: each method at its latest checkpoint whose total seconds (mean over seeds) is within the
    fastest method's end of run."""
    lines = []
    for n in sorted({p["n"] for p in points}, reverse=True):
        mine = {method: curve for (method, m), curve in curves(points, "total_s").items() if m == n}
        budget = min(xs[-1] for xs, _ in mine.values())
        cells = []
        for method in (m for m in names(points) if m in mine):
            xs, values = mine[method]
            within = [i for i, x in enumerate(xs) if x <= budget * 1.001]
            if not within:
                cells.append(f"{series_label(method)} no checkpoint yet")
                continue
            i = within[-1]
            iterations = sorted({p["iterations"] for p in points if (p["method"], p["n"]) == (method, n)})[i]
            passes = next(p["passes"] for p in points if (p["method"], p["n"], p["iterations"]) == (method, n, iterations))
            cells.append(f"{series_label(method)} {cell(values['domain_fid_to_teacher'][i])} FID to teacher, "
                         f"{cell(values['psnr'][i])} dB ({passes} passes, {xs[i]:.0f} s)")
        lines.append(f"- N = {n}, within {budget:.0f} s total: " + "; ".join(cells))
    return "\n".join(lines)


def report(result: dict) -> str:
    args, stage_s, points, teachers = result["args"], result["stage_a_s"], result["points"], result["teachers"]
    return (f"{SECTION}\n\n**Machine.** {result['machine']}.\n\n**Command.** `{result['command']}` "
            f"({result['seconds']:.0f} s in all).\n\n"
            f"**Setup.** Teacher `assets/shapes-teacher`, built-in shapes captions ({args['eval_fraction']:.0%} held "
            f"out), N·M = {STEPS} teacher steps at guidance {args['guidance']:g}; seeds {args['seeds']}; "
            f"{args['passes']} student passes per run, measured at {args['points']} checkpoints; "
            f"RAPM's LoRA rank {', '.join(map(str, args.get('ranks') or [DEFAULT_RANK]))} (the rest rank "
            f"{', '.join(map(str, args.get('peer_ranks') or [DEFAULT_RANK]))}); {args['num_images']} "
            f"eval images per seed against the teacher's {STEPS}-step samples of the same noise. Cells: mean ± std "
            f"over seeds [± half-width of the 95 % t-interval] (one value without intervals for one seed). "
            f"Curves: `benchmarks/{PNG['total_s']}`, `benchmarks/{PNG['passes']}`.\n\n"
            f"### At the end of each run\n\n{final_table(points, stage_s, teachers)}\n\n"
            f"### At equal total time\n\n{equal_time(points)}\n")


def ranks(method: str, args: argparse.Namespace) -> list[int]:
    """The LoRA ranks one method is run at: --ranks for RAPM, --peer-ranks for the others."""
    chosen = args.ranks if method == "rapm" else args.peer_ranks
    return chosen or [DEFAULT_RANK]


def measure(args: argparse.Namespace) -> dict:
    """Stage A, every run's checkpoints and the teacher's samplers: the benchmark's result."""
    t0 = time.perf_counter()
    work = Path(args.work)
    configs, stage_s = stage_a(work, sorted(args.ns), args)
    # The 32-step reference is one chain for every N (same teacher, same noise): sampled once per seed.
    references = {s: teacher_reference(configs[max(configs)], 1000 + s, args.num_images) for s in args.seeds}
    # Seed by seed: a run stopped early has the first seeds of every curve, not all seeds of a few.
    jobs = [CurveJob(m, n, s, configs[n].model_dump_json(), args.passes, args.points, args.num_images, references[s], r)
            for s in args.seeds for n in sorted(args.ns, reverse=True) for m in args.methods
            for r in ranks(m, args)]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        teacher_futures = {n: [pool.submit(measure_teachers, configs[n].model_dump_json(), 1000 + s, args.num_images,
                                           ("teacher_ddim", "dpm_solver"), references[s]) for s in args.seeds]
                           for n in configs}
        points = [row for f in [pool.submit(run_curve, job) for job in jobs] for row in f.result()]
        teachers = {n: [f.result() for f in fs] for n, fs in teacher_futures.items()}
    for p in points:
        p["stage_a_s"] = stage_s[p["n"]]
        p["total_s"] = p["stage_a_s"] + p["train_s"]
    return {"stage_a_s": stage_s, "points": points, "teachers": teachers, "args": vars(args), "machine": machine(),
            "command": shlex.join([".venv/bin/python", "benchmarks/time_curves.py", *sys.argv[1:]]),
            "seconds": time.perf_counter() - t0}


def load_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    result["stage_a_s"] = {int(n): v for n, v in result["stage_a_s"].items()}
    result["teachers"] = {int(n): v for n, v in result["teachers"].items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/time-curves", help="work dir (re-run to reuse finished runs)")
    parser.add_argument("--ns", nargs="+", type=int, default=[4, 2], help="student steps")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS),
                        help="pcm-published: the quality benchmark's PCM as published (adversarial)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=None,
                        help=f"RAPM's LoRA ranks, one curve each (default: the distill config's {DEFAULT_RANK}; "
                             "the peers: --peer-ranks)")
    parser.add_argument("--peer-ranks", nargs="+", type=int, default=None,
                        help=f"the peers' LoRA ranks, one curve each (default {DEFAULT_RANK})")
    parser.add_argument("--passes", type=int, default=1200, help="student forward+backward passes per run")
    parser.add_argument("--points", type=int, default=4, help="checkpoints measured along each run")
    parser.add_argument("--num-images", type=int, default=128, help="eval images per seed")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--plots", default=str(REPO / "benchmarks"), help="where the two PNGs go")
    parser.add_argument("--write", action="store_true", help="replace its section of RESULTS.md")
    parser.add_argument("--report-only", action="store_true",
                        help="plot and report WORK/time_curves.json again, running nothing")
    args = parser.parse_args(argv)
    quiet()
    # made before the runs: a long measurement must not end on a missing plots dir
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    saved = Path(args.work) / "time_curves.json"
    if args.report_only:
        result = load_result(saved)
    else:
        result = measure(args)
        saved.write_text(json.dumps(result, indent=1, default=str))
        result = load_result(saved)
    points, teachers = result["points"], result["teachers"]
    plot(points, "total_s", "total seconds (Stage A + training)", Path(args.plots) / PNG["total_s"], teachers)
    plot(points, "passes", "student forward+backward passes", Path(args.plots) / PNG["passes"], teachers)
    section = report(result)
    print(section)
    if args.write:
        write_section(section, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
