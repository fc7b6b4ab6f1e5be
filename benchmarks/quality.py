"""Quality benchmark: RAPM against its peers (PCM, LCM-LoRA) at equal budget, the paper's
discriminators swept, N ∈ {1, 2, 4}, every number over training seeds with its interval.

On the embedded default (shapes teacher, built-in captions). One prompt store and one trajectory
store per N (N·M = 32 teacher steps for every N, so the teacher's reference is the same chain);
every run distils with the real loop (``rapm_core.distill.run.run_distillation``) and its student
is measured on the held-out prompts by the shapes domain's metric (domain FID, KID, k-NN
precision/recall/coverage, adherence) against real renders of the same prompts. Training seed s
(data order, LoRA init, training noise) is evaluated with its own fresh eval noise (eval seed
1000 + s), so the spread over seeds covers both; teacher baselines are measured at every eval
seed the same way. Equal budget = equal student forward+backward passes (RAPM makes N per
iteration, the peers one); wall time is reported beside it. The N = 4 runs are also measured at
points along the way: domain FID against student passes (``benchmarks/quality_curve.png``).

Every method is also measured against the teacher's N·M-step samples of the same eval noise
(latent MSE and image PSNR to that reference, FID to the teacher).

The same protocol on the embedded rectified-flow teacher (``--teacher assets/shapes-flow-teacher``,
its section "## Quality on the embedded flow teacher"): the N-step baseline is then Euler, on the
even pre-shift grid RAPM uses and on the stock pipeline's default grid, and DPM-Solver++ in its flow
form; the variants are those built for such a teacher (``--variants rapm rapm-n2 rapm-n1 pcm pcm-n2 pcm-n1``).

Intervals: mean ± sample std over seeds, and the 95 % t-interval of the mean (3 seeds: ± 2.48 std).

Run: ``.venv/bin/python benchmarks/quality.py`` (all groups; 80 min on 2 CPU cores before PCM at N = 2 and 1 joined them), or
``--groups peers --seeds 0 --passes 200 --num-images 64 --no-write`` to try it. Finished runs are
reused from ``--work`` (each run dir resumes), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from flows.pipeline import prepare  # noqa: E402
from rapm_core.distill.config import MethodConfig  # noqa: E402
from rapm_core.distill.run import run_distillation  # noqa: E402
from rapm_core.pipeline import PipelineConfig  # noqa: E402
from rapm_core.trajectories.generate import generate_trajectories  # noqa: E402
from rapm_shapes.assets import EMBEDDED_FLOW_TEACHER, EMBEDDED_TEACHER  # noqa: E402
from rapm_core.ingest.engine import ingest_prompts  # noqa: E402

from quality_measure import TEACHER_METHODS, measure_student, measure_teachers, teacher_reference  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
CURVE_PNG = REPO / "benchmarks" / "quality_curve.png"
SECTION = "## Quality"
# Each embedded teacher's section of RESULTS.md (another teacher's: "## Quality on `DIR`").
SECTIONS = {EMBEDDED_TEACHER.name: SECTION, EMBEDDED_FLOW_TEACHER.name: "## Quality on the embedded flow teacher"}
STEPS = 32  # N·M for every N (``--steps``)
ADV_FAST = {"disc_channels": 64}  # narrower heads keep the adversarial sweep inside the time budget

# group → name → (what it tests, N, method options over the defaults)
GROUPS: dict[str, dict[str, tuple[str, int, dict[str, Any]]]] = {
    "peers": {
        "rapm": ("RAPM, defaults", 4, {}),
        "pcm": ("PCM, x0 from the store", 4, {"method": "pcm"}),
        "lcm": ("LCM-LoRA, x0 from the store", 4, {"method": "lcm"}),
        "pcm-renders": ("PCM, x0 = real renders", 4, {"method": "pcm", "x0_source": "renders"}),
        "lcm-renders": ("LCM-LoRA, x0 = real renders", 4, {"method": "lcm", "x0_source": "renders"}),
        # RAPM's lr is tuned for RAPM; the peers' curves rise again at it, so they get a lower one too.
        "pcm-lr1e-4": ("PCM, x0 from the store, lr 1e-4", 4, {"method": "pcm", "lr": 1e-4}),
        "lcm-lr1e-4": ("LCM-LoRA, x0 from the store, lr 1e-4", 4, {"method": "lcm", "lr": 1e-4}),
        # The README's "as published" command (its discriminator optimizer and schedule come with
        # --pcm-adversarial, its teacher guidance is its script's) with PCM's discriminator layout.
        "pcm-published": ("PCM as published (adversarial)", 4,
                          {"method": "pcm", "pcm_adversarial": True, "disc_layout": "pcm",
                           "teacher_guidance": (5.0, 6.0)}),
    },
    "steps": {
        "rapm-n2": ("RAPM, N = 2", 2, {}),
        "rapm-n1": ("RAPM, N = 1", 1, {}),
        "pcm-n2": ("PCM, N = 2, x0 from the store", 2, {"method": "pcm"}),
        "pcm-n1": ("PCM, N = 1, x0 from the store", 1, {"method": "pcm"}),
    },
    "adversarial": {
        "adv-l1": ("adversarial, λ_adv 1 (the paper's loss)", 4, {**ADV_FAST, "loss_relative": "adversarial",
                                                                   "loss_absolute": "adversarial"}),
        "adv-l1-lr1e-4": ("adversarial, λ_adv 1, lr 1e-4", 4, {**ADV_FAST, "loss_relative": "adversarial",
                                                               "loss_absolute": "adversarial", "lr": 1e-4}),
        "adv-l0.1": ("adversarial, λ_adv 0.1", 4, {**ADV_FAST, "loss_relative": "adversarial",
                                                   "loss_absolute": "adversarial", "lambda_adv": 0.1}),
        "adv-l0.01": ("adversarial, λ_adv 0.01", 4, {**ADV_FAST, "loss_relative": "adversarial",
                                                     "loss_absolute": "adversarial", "lambda_adv": 0.01}),
        "adv-pcm-d": ("adversarial, λ 0.1, PCM's D (lr 1e-5, betas 0/0.999)", 4,
                      {**ADV_FAST, "loss_relative": "adversarial", "loss_absolute": "adversarial", "lambda_adv": 0.1,
                       "lr_disc": 1e-5, "disc_betas": (0.0, 0.999)}),
        "adv-alternate": ("adversarial, λ 0.1, PCM's D, alternating D/G", 4,
                          {**ADV_FAST, "loss_relative": "adversarial", "loss_absolute": "adversarial",
                           "lambda_adv": 0.1, "lr_disc": 1e-5, "disc_betas": (0.0, 0.999), "disc_schedule": "alternate"}),
        "both-l0.1": ("pointwise + adversarial λ 0.1", 4, {**ADV_FAST, "loss_relative": "both",
                                                           "loss_absolute": "both", "lambda_adv": 0.1}),
        "both-l0.01": ("pointwise + adversarial λ 0.01", 4, {**ADV_FAST, "loss_relative": "both",
                                                             "loss_absolute": "both", "lambda_adv": 0.01}),
    },
}
VARIANTS = {name: spec for group in GROUPS.values() for name, spec in group.items()}
CURVE = ("rapm", "pcm", "lcm", "pcm-lr1e-4", "lcm-lr1e-4")  # measured along the way too


@dataclass
class Job:
    name: str
    seed: int
    config_json: str  # the benchmark's PipelineConfig for this job's N
    passes: int
    curve_points: int
    num_images: int
    reference: Any = None  # the teacher's N·M-step samples of this seed's eval noise (SamplerSamples)


@dataclass
class RunResult:
    name: str
    seed: int
    metrics: dict[str, float]
    passes: int
    wall_s: float
    distill_s: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (student passes, domain FID)


def base_config(work: Path, n: int, args: argparse.Namespace) -> PipelineConfig:
    steps = getattr(args, "steps", STEPS)
    return PipelineConfig(
        work=str(work / f"n{n}"), teacher=str(getattr(args, "teacher", EMBEDDED_TEACHER)),
        prompts=str(work / "prompts.txt"), seed=0, threads=1, ingest={"eval_fraction": args.eval_fraction},
        trajectories={"slots": n, "steps_per_slot": steps // n, "guidance": args.guidance, "batch_size": 16,
                      "max_sequence_length": getattr(args, "max_sequence_length", 16)})


def shared_stages(work: Path, ns: list[int], args: argparse.Namespace) -> dict[int, PipelineConfig]:
    """The prompt store (one split for every N) and a trajectory store per N."""
    configs = {}
    for n in ns:
        config = base_config(work, n, args)
        prepare(config.model_copy(update={"prompts": None, "work": str(work)}))  # writes WORK/prompts.txt
        prepare(config)
        ingest_prompts(config.ingest_config())
        generate_trajectories(config.trajectories_config(), log=lambda m: None)
        (work / f"n{n}-config.json").write_text(config.model_dump_json(indent=1))
        configs[n] = config
    return configs


def passes_per_iteration(options: dict[str, Any], n: int) -> int:
    method = MethodConfig.from_options(**options)
    return n if method.method == "rapm" and method.rapm.slots_per_iteration == "all" else 1


def run_job(job: Job) -> RunResult:
    """Distil one variant at one seed (extending the run to each curve point), then measure it; the
    result is kept beside the run dir, so a re-run of the benchmark measures nothing twice."""
    torch.set_num_threads(1)
    quiet()
    config = PipelineConfig.model_validate_json(job.config_json)
    _, n, options = VARIANTS[job.name]
    method = MethodConfig.from_options(**{**options, "init_seed": job.seed})
    per_iteration = passes_per_iteration(options, n)
    total = max(1, job.passes // per_iteration)
    run_dir = Path(config.work) / "runs" / f"{job.name}-s{job.seed}"
    kept = run_dir.parent / f"{run_dir.name}-result-{job.passes}-{job.curve_points}-{job.num_images}.json"
    if kept.is_file():
        return RunResult(**json.loads(kept.read_text()))
    points = sorted({max(1, round(total * k / job.curve_points)) for k in range(1, job.curve_points + 1)})
    curve, t0 = [], time.perf_counter()
    for iterations in points:
        distill = config.distill_config().model_copy(update={
            **dict(method), "out": str(run_dir), "seed": job.seed, "iterations": iterations,
            "checkpoint_every": max(1, total // 4), "keep_checkpoints": 1})
        run_distillation(distill, log=lambda m: None)
        if iterations != total:
            measured = measure_student(config, run_dir, 1000 + job.seed, job.num_images, job.reference)
            curve.append((iterations * per_iteration, measured["domain_fid"]))
    wall = time.perf_counter() - t0
    metrics = measure_student(config, run_dir, 1000 + job.seed, job.num_images, job.reference)
    curve.append((total * per_iteration, metrics["domain_fid"]))
    distill_s = sum(json.loads(line).get("seconds", 0.0) for line in (run_dir / "metrics.jsonl").open())
    result = RunResult(job.name, job.seed, metrics, total * per_iteration, wall, distill_s, curve)
    write_atomic(kept, json.dumps(result.__dict__))
    return result


def reference_samples(config_json: str, seed: int, num_images: int):
    """The teacher's N·M-step samples of one eval seed's noise, in a worker (one torch thread); kept
    in the store's work dir, so a re-run of the benchmark samples them once."""
    config = PipelineConfig.model_validate_json(config_json)
    kept = Path(config.work) / f"reference-s{seed}-{num_images}.pt"
    if kept.is_file():
        return torch.load(kept, weights_only=False)
    torch.set_num_threads(1)
    quiet()
    samples = teacher_reference(config, seed, num_images)
    tmp = kept.with_name(kept.name + ".tmp")
    torch.save(samples, tmp)
    tmp.replace(kept)
    return samples


def teacher_rows(config_json: str, seed: int, num_images: int, methods: tuple[str, ...], reference) -> dict[str, dict]:
    """``measure_teachers``, kept in the store's work dir like a run's result."""
    kept = Path(PipelineConfig.model_validate_json(config_json).work) / f"teachers-s{seed}-{num_images}.json"
    if kept.is_file():
        rows = json.loads(kept.read_text())
        if all(m in rows for m in methods if m != "euler_default"):  # that row exists for flow teachers only
            return rows
    rows = measure_teachers(config_json, seed, num_images, methods, reference)
    write_atomic(kept, json.dumps(rows))
    return rows


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


# -- aggregation ------------------------------------------------------------------------------------
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95 % t quantiles by dof


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the 95 % t-interval of the mean); std 0 for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0, math.nan
    std = statistics.stdev(values)
    return mean, std, T975.get(len(values) - 1, 1.96) * std / math.sqrt(len(values))


def cell(values: list[float], fmt: str = "{:.2f}") -> str:
    mean, std, half = interval(values)
    if len(values) < 2:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(std)} [±{fmt.format(half)}]"


KEYS = (("domain_fid", "domain FID ↓", "{:.2f}"), ("domain_kid", "KID ↓", "{:.4f}"),
        ("domain_recall", "recall ↑", "{:.3f}"), ("domain_precision", "precision ↑", "{:.3f}"),
        ("prompt_adherence", "adherence ↑", "{:.3f}"), ("psnr", "PSNR to ref (dB) ↑", "{:.2f}"),
        ("latent_mse", "latent MSE to ref ↓", "{:.4f}"))


def table(rows: list[tuple[str, list[dict[str, float]], str]]) -> str:
    """rows: (label, one metrics dict per seed, extra cell)."""
    head = "| | " + " | ".join(title for _, title, _ in KEYS) + " | passes · wall s |"
    lines = [head, "|" + "---|" * (len(KEYS) + 2)]
    for label, per_seed, extra in rows:
        values = {k: [m.get(k) for m in per_seed] for k, _, _ in KEYS}  # None: not measured (the reference itself)
        lines.append(f"| {label} | " + " | ".join("–" if None in values[k] else cell(values[k], fmt)
                                                  for k, _, fmt in KEYS) + f" | {extra} |")
    return "\n".join(lines)


def plot_curve(results: list[RunResult], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in CURVE:
        runs = [r for r in results if r.name == name and r.curve]
        if not runs:
            continue
        xs = [p for p, _ in runs[0].curve]
        fids = [[dict(r.curve).get(x) for r in runs] for x in xs]
        means = [statistics.fmean(v) for v in fids]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in fids]
        ax.plot(xs, means, marker="o", label=VARIANTS[name][0])
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set_xlabel("student forward+backward passes")
    ax.set_ylabel("domain FID (mean ± std over seeds)")
    ax.set_title("N = 4, equal student passes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or 'CPU'}, {multiprocessing.cpu_count()} cores, "
            f"torch {torch.__version__}, 1 torch thread per process, "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def write_section(body: str, section: str = SECTION) -> None:
    """Replace the ``section`` heading's section of RESULTS.md (``## Quality``, not "## Quality on …"),
    keeping the rest; appended when there is none."""
    import re

    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    match = re.search(rf"^{re.escape(section)}$", text, flags=re.MULTILINE)
    if match:
        head, rest = text[:match.start()], text[match.end():]
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head.rstrip() + "\n\n" + body.rstrip() + "\n" + tail
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(RESULTS)


def report(results: list[RunResult], teachers: dict[int, list[dict[str, dict]]], args, seconds: float) -> str:
    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)

    def student_row(name: str) -> tuple[str, list[dict[str, float]], str]:
        runs = by_name[name]
        wall = statistics.fmean(r.distill_s for r in runs)
        return f"{name}: {VARIANTS[name][0]}", [r.metrics for r in runs], f"{runs[0].passes} · {wall:.0f}"

    def teacher_rows(n: int) -> list[tuple[str, list[dict[str, float]], str]]:
        per_seed = teachers[n]
        return [(per_seed[0][m]["label"], [s[m] for s in per_seed], f"NFE {per_seed[0][m]['nfe']}")
                for m in TEACHER_METHODS if m in per_seed[0]]

    parts = []
    for group, title in (("peers", "N = 4: RAPM and its peers at equal student passes"),
                         ("steps", "N = 2 and N = 1"), ("adversarial", "The paper's discriminators, swept (N = 4)")):
        names = [n for n in GROUPS[group] if n in by_name]
        if not names:
            continue
        ns = sorted({VARIANTS[n][1] for n in names})
        rows = [row for n in ns for row in teacher_rows(n)] + [student_row(n) for n in names]
        parts.append(f"### {title}\n\n{table(rows)}\n")
    parts.append(targets(by_name, teachers))
    command = "`" + shlex.join([".venv/bin/python", "benchmarks/quality.py", *sys.argv[1:]]) + "`"
    curve = curve_png(args.teacher)
    return (f"{section_for(args.teacher)}\n\n**Machine.** {machine()}.\n\n**Command.** {command} "
            f"({seconds:.0f} s in all).\n\n"
            f"**Setup.** Teacher `{teacher_label(args.teacher)}`, built-in shapes captions ({args.eval_fraction:.0%} held "
            f"out), N·M = {args.steps} teacher steps at guidance {args.guidance:g}; seeds {args.seeds}; "
            f"{args.passes} student passes per run; {args.num_images} eval images per seed; PSNR and latent MSE "
            f"against the teacher's {args.steps}-step samples of the same noise. Cells: mean ± std over "
            f"seeds [± half-width of the 95 % t-interval]."
            + (f" Curve: `benchmarks/{curve.name}`." if curve.is_file() and args.curve_points > 1 else "") + "\n\n"
            + "\n".join(parts))


def teacher_label(teacher: str) -> str:
    path = Path(teacher).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else teacher


def section_for(teacher: str) -> str:
    return SECTIONS.get(Path(teacher).name, f"## Quality on `{teacher_label(teacher)}`")


def curve_png(teacher: str) -> Path:
    return CURVE_PNG if Path(teacher).name == EMBEDDED_TEACHER.name else CURVE_PNG.with_name(
        f"quality_curve_{Path(teacher).name}.png")


def separated(a: list[float], b: list[float]) -> bool:
    """Whether the 95 % t-intervals of two means do not overlap."""
    (ma, _, ha), (mb, _, hb) = interval(a), interval(b)
    return not (math.isnan(ha) or math.isnan(hb)) and abs(ma - mb) > ha + hb


def below_fraction(a: list[float], b: list[float], fraction: float) -> bool:
    """Whether mean(a) ≤ fraction · mean(b) holds beyond the intervals: the top of a's 95 % t-interval
    is below ``fraction`` times the bottom of b's."""
    (ma, _, ha), (mb, _, hb) = interval(a), interval(b)
    return not (math.isnan(ha) or math.isnan(hb)) and ma + ha <= fraction * (mb - hb)


def targets(by_name: dict[str, list[RunResult]], teachers: dict[int, list[dict[str, dict]]]) -> str:
    lines = ["### Targets (measured in this run)", ""]
    fid = {name: [r.metrics["domain_fid"] for r in runs] for name, runs in by_name.items()}
    recall = {name: [r.metrics["domain_recall"] for r in runs] for name, runs in by_name.items()}
    pairs = [("rapm", peer) for peer in ("pcm", "lcm", "pcm-renders", "lcm-renders", "pcm-lr1e-4", "lcm-lr1e-4",
                                         "pcm-published")] + [("rapm-n2", "pcm-n2"), ("rapm-n1", "pcm-n1")]
    for mine, peer in pairs:
        if mine in fid and peer in fid:
            lower = statistics.fmean(fid[mine]) < statistics.fmean(fid[peer])
            lines.append(f"- RAPM vs {peer} (N = {VARIANTS[peer][1]}, equal passes): FID "
                         f"{statistics.fmean(fid[mine]):.2f} vs {statistics.fmean(fid[peer]):.2f} — "
                         f"{'lower' if lower else 'not lower'}, intervals "
                         f"{'separated' if separated(fid[mine], fid[peer]) else 'overlap'}; recall "
                         f"{statistics.fmean(recall[mine]):.3f} vs {statistics.fmean(recall[peer]):.3f}")
    if "rapm-n2" in fid and 2 in teachers:
        for method in ("teacher_ddim", "euler_default"):
            if method not in teachers[2][0]:
                continue
            baseline = [t[method]["domain_fid"] for t in teachers[2]]
            ratio = statistics.fmean(fid["rapm-n2"]) / statistics.fmean(baseline)
            lines.append(f"- N = 2: RAPM FID / {teachers[2][0][method]['label']} FID = {ratio:.3f} (target ≤ 0.5: "
                         f"{'met' if ratio <= 0.5 else 'not met'} by the means; beyond the intervals: "
                         f"{'yes' if below_fraction(fid['rapm-n2'], baseline, 0.5) else 'no'})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/quality-v5", help="work dir (re-run to reuse finished runs)")
    parser.add_argument("--teacher", default=str(EMBEDDED_TEACHER),
                        help=f"teacher dir (assets/{EMBEDDED_FLOW_TEACHER.name}: the embedded flow teacher)")
    parser.add_argument("--steps", type=int, default=STEPS, help="N·M: teacher steps of every trajectory")
    parser.add_argument("--max-sequence-length", type=int, default=16,
                        help="SD3-class teachers: T5 tokens per prompt (the embedded flow teacher's card: 16)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: the groups'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--adversarial-seeds", nargs="+", type=int, default=[0],
                        help="seeds of the adversarial sweep (a screen; repeat its best with more)")
    parser.add_argument("--passes", type=int, default=1200, help="student forward+backward passes per run")
    parser.add_argument("--curve-points", type=int, default=6)
    parser.add_argument("--num-images", type=int, default=320, help="eval images per seed")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = parser.parse_args(argv)
    quiet()
    t0 = time.perf_counter()
    work = Path(args.work)
    names = args.variants or [n for g in args.groups for n in GROUPS[g]]
    configs = shared_stages(work, sorted({VARIANTS[n][1] for n in names}), args)
    seeds = sorted({s for name in names for s in (args.adversarial_seeds if name in GROUPS["adversarial"]
                                                  else args.seeds)} | set(args.seeds))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        # The N·M-step reference is one chain for every N (same teacher, same noise): sampled once per
        # eval seed, at the largest N, before the runs that are measured against it.
        top = max(configs)
        refs = {s: pool.submit(reference_samples, configs[top].model_dump_json(), 1000 + s, args.num_images)
                for s in seeds}
        references = {s: f.result() for s, f in refs.items()}
        jobs = [Job(name, seed, configs[VARIANTS[name][1]].model_dump_json(), args.passes,
                    args.curve_points if name in CURVE else 1, args.num_images, references[seed])
                for name in names for seed in (args.adversarial_seeds if name in GROUPS["adversarial"] else args.seeds)]
        teacher_futures = {(n, s): pool.submit(teacher_rows, c.model_dump_json(), 1000 + s, args.num_images,
                                               TEACHER_METHODS if n == top else TEACHER_METHODS[1:], references[s])
                           for n, c in configs.items() for s in args.seeds}
        futures = {pool.submit(run_job, job): job for job in jobs}
        done: dict[Any, Any] = {}
        # What has finished is on disk as it comes: an interrupted benchmark loses no finished number.
        for future in as_completed([*teacher_futures.values(), *futures]):
            done[future] = future.result()
            save_results(work, [done[f] for f in futures if f in done],
                         {f"{n}-s{s}": done[f] for (n, s), f in teacher_futures.items() if f in done})
        results = [done[f] for f in futures]
        teachers = {n: [done[teacher_futures[n, s]] for s in args.seeds] for n in configs}
    curve = curve_png(args.teacher)
    if args.curve_points > 1 and any(len(r.curve) > 1 for r in results if r.name in CURVE):
        plot_curve(results, curve)
    section = report(results, teachers, args, time.perf_counter() - t0)
    print(section)
    if not args.no_write:
        write_section(section, section_for(args.teacher))
        print(f"wrote {RESULTS}")
    return 0


def save_results(work: Path, runs: list[RunResult], teachers: dict[str, dict]) -> None:
    write_atomic(work / "results.json", json.dumps({"runs": [r.__dict__ for r in runs], "teachers": teachers},
                                                   indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
