"""``rapm plan`` checked against real runs on this CPU, and its table for both presets.

Part 1 (validation): a mid-size UNet (SD 1.5's block layout at width 64, 256 px; see
``planner.validation.mid_size``) and SD 1.5's own config at 128 px run the project's
real ``Trainer.train_step`` (RAPM, PCM, LCM-LoRA) and ``teacher_trajectories`` on CPU with
random weights. Measured: the live-tensor peak (the planner's own counting mode on CPU
storages, i.e. what a caching allocator's "allocated" sees) and the RSS growth; predicted: the
planner on meta tensors. Part 2 (the engine): ``rapm distill``'s own trainer
(``build_trainer``: the store's teacher loaded in ``--weights-dtype``) on a real store made by
``generate_trajectories``, against the plan made from the teacher's config files — on a
mid-size teacher directory, and on ``--engine-teacher DIR`` (e.g. the SD 1.5-sized dry run's,
``benchmarks/sd_dry_run.py``) at its native size. Part 3: the planner's peaks for SD 1.5
(512²) and SDXL (1024²): fp32 vs bf16, pointwise vs adversarial, with and without gradient
checkpointing, the peers, and the math-attention upper bound for two of them. ``--sd3``: the
same for SD3-class teachers instead — a mid-size SD3.5 layout (``planner.validation.mid_size_sd3``)
against real CPU runs, and the SD3 Medium, SD3.5 Medium and SD3.5 Large presets at 1024².

Run: ``.venv/bin/python benchmarks/plan_validation.py [--skip-presets] [--engine-teacher DIR] [--sd3]``
(prints markdown).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_common import machine, prompt_store  # noqa: E402
from rapm_core.distill.config import MethodConfig  # noqa: E402
from planner import PlanConfig  # noqa: E402
from planner.architecture import from_preset  # noqa: E402
from rapm_testing.random_pipeline import save_random_pipeline  # noqa: E402
from planner.stages import STAGES  # noqa: E402
from planner.validation import compare, compare_run, mid_size, mid_size_sd3  # noqa: E402
from rapm_core.trajectories.config import TrajectoriesConfig  # noqa: E402
from rapm_core.trajectories.generate import generate_trajectories  # noqa: E402

GiB, MiB = 2 ** 30, 2 ** 20
ADV = {"loss_relative": "adversarial", "loss_absolute": "adversarial"}
PCM_ADV = {"method": "pcm", "pcm_adversarial": True}
HEADER = ("| predicted MiB | measured live MiB | predicted / measured | predicted working MiB | RSS growth MiB | "
          "working / RSS |")


def _label(method: dict) -> str:
    return ", ".join(f"{k.replace('loss_', '')}={v}" for k, v in method.items()) or "default (RAPM, pointwise)"


def _cells(r: dict) -> str:
    rss = r["ratio_working_vs_rss"]
    return (f"{r['predicted_peak_bytes'] / MiB:.1f} | {r['measured_peak_bytes'] / MiB:.1f} | {r['ratio_live']:.3f} | "
            f"{r['predicted_working_bytes'] / MiB:.1f} | {r['measured_rss_growth_bytes'] / MiB:.1f} | "
            f"{'—' if rss is None else f'{rss:.2f}'} |")


def validation_rows(width: int) -> list[str]:
    mid, real = mid_size(width=width), from_preset("sd15")
    cases = [(mid, 256, "distill", "fp32", {}), (mid, 256, "distill", "fp32", {"gradient_checkpointing": True}),
             (mid, 256, "distill", "fp32", ADV), (mid, 256, "distill", "fp32", {**ADV, "gradient_checkpointing": True}),
             (mid, 256, "distill", "bf16", {}), (mid, 256, "distill", "fp32", PCM_ADV),
             (mid, 256, "distill", "bf16", {"method": "lcm"}), (mid, 256, "trajectories", "fp32", {}),
             (real, 128, "distill", "fp32", {}),
             (real, 128, "distill", "fp32", {**ADV, "gradient_checkpointing": True}),
             (real, 128, "distill", "bf16", PCM_ADV), (real, 128, "trajectories", "fp32", {})]
    rows = ["| UNet | stage | precision | method " + HEADER, "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, resolution, stage, precision, method in cases:
        config = PlanConfig(preset="sd15", resolution=resolution, slots=2, steps_per_slot=2, batch_size=2,
                            precision=precision, method=MethodConfig.from_options(**method))
        r = compare(stage, arch, config)
        unet = f"{'SD 1.5 config' if arch is real else f'SD 1.5 layout, width {width}'}, {resolution} px"
        rows.append(f"| {unet} | {stage} | {precision} | {_label(method)} | {_cells(r)}")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def engine_rows(width: int, teachers: list[str], work: Path) -> list[str]:
    """``rapm distill``'s trainer on a real store (one trajectory, N = 2, M = 2) vs the plan."""
    mid = work / "mid-teacher"
    save_random_pipeline(mid_size(width=width), mid)
    rows = ["| teacher | weights | method " + HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for i, teacher in enumerate([str(mid), *teachers]):
        store = work / f"store-{i}"
        generate_trajectories(TrajectoriesConfig(prompts=str(prompt_store(work / f"prompts-{i}", 1)), teacher=teacher,
                                                 out=str(store), slots=2, steps_per_slot=2, device="cpu"),
                              log=lambda _m: None)
        for method in ({"weights_dtype": "bf16"}, {"weights_dtype": "bf16", **ADV, "gradient_checkpointing": True},
                       {"weights_dtype": "fp32"}):
            r = compare_run(str(store), MethodConfig.from_options(**method))
            name = f"SD 1.5 layout, width {width}, 256 px" if i == 0 else teacher
            rows.append(f"| {name} | {method['weights_dtype']} | {_label(method)} | {_cells(r)}")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def preset_rows() -> list[str]:
    rows = ["| preset | precision | losses | checkpointing | trajectories GiB | distill GiB (weights) | "
            "evaluate GiB |", "|---|---|---|---|---|---|---|"]
    for preset in ("sd15", "sdxl"):
        arch = from_preset(preset)
        for precision in ("fp32", "bf16"):
            base = PlanConfig(preset=preset, precision=precision)
            traj = STAGES["trajectories"](arch, base).peak_bytes / GiB
            ev = STAGES["evaluate"](arch, base).peak_bytes / GiB
            for losses, method in (("pointwise", {}), ("adversarial", ADV), ("PCM adversarial", PCM_ADV),
                                   ("LCM", {"method": "lcm"})):
                for ckpt in (False, True):
                    options = MethodConfig.from_options(**method, gradient_checkpointing=ckpt)
                    d = STAGES["distill"](arch, PlanConfig(preset=preset, precision=precision, method=options))
                    rows.append(f"| {preset} | {precision} | {losses} | {'yes' if ckpt else 'no'} | {traj:.2f} | "
                                f"{d.peak_bytes / GiB:.2f} ({d.weights_bytes / GiB:.2f}) | {ev:.2f} |")
                    print(rows[-1], file=sys.stderr, flush=True)
    rows += ["", "| preset, bf16, pointwise, no checkpointing | distill GiB, efficient attention | "
                 "distill GiB, math attention |", "|---|---|---|"]
    for preset in ("sd15", "sdxl"):
        arch = from_preset(preset)
        eff, math = (STAGES["distill"](arch, PlanConfig(preset=preset, precision="bf16", attention=a)).peak_bytes
                     for a in ("efficient", "math"))
        rows.append(f"| {preset} | {eff / GiB:.2f} | {math / GiB:.2f} |")
    return rows


def sd3_rows() -> list[str]:
    """SD3 class: the mid-size layout against real CPU runs (RAPM pointwise and adversarial, PCM
    with and without its discriminator), then the presets' peaks at 1024² (RAPM pointwise)."""
    mid = mid_size_sd3()
    rows = ["| transformer | stage | precision | method " + HEADER, "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, precision, method in (("distill", "fp32", {}), ("distill", "fp32", {"gradient_checkpointing": True}),
                                     ("distill", "bf16", {}), ("distill", "bf16", {"slots_per_iteration": "random"}),
                                     ("distill", "fp32", {"loss_relative": "both"}),
                                     ("distill", "fp32", {"method": "pcm"}),
                                     ("distill", "fp32", {"method": "pcm", "pcm_adversarial": True}),
                                     ("trajectories", "fp32", {}), ("trajectories", "bf16", {})):
        config = PlanConfig(preset="sd35-medium", resolution=256, slots=2, steps_per_slot=2, batch_size=2,
                            precision=precision, max_sequence_length=mid.max_sequence_length,
                            method=MethodConfig.from_options(**method))
        r = compare(stage, mid, config)
        rows.append(f"| {mid.source}, 256 px | {stage} | {precision} | {_label(method)} | {_cells(r)}")
        print(rows[-1], file=sys.stderr, flush=True)
    rows += ["", "| preset | precision | checkpointing | trajectories GiB (weights) | distill GiB (weights) | "
                 "evaluate GiB |", "|---|---|---|---|---|---|"]
    for preset in ("sd3-medium", "sd35-medium", "sd35-large"):
        arch = from_preset(preset)
        for precision in ("fp32", "bf16"):
            base = PlanConfig(preset=preset, precision=precision)
            traj = STAGES["trajectories"](arch, base)
            ev = STAGES["evaluate"](arch, base).peak_bytes / GiB
            for ckpt in (False, True):
                options = MethodConfig.from_options(gradient_checkpointing=ckpt)
                d = STAGES["distill"](arch, PlanConfig(preset=preset, precision=precision, method=options))
                rows.append(f"| {preset} | {precision} | {'yes' if ckpt else 'no'} | {traj.peak_bytes / GiB:.2f} "
                            f"({traj.weights_bytes / GiB:.2f}) | {d.peak_bytes / GiB:.2f} "
                            f"({d.weights_bytes / GiB:.2f}) | {ev:.2f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="mid-size UNet's first width (SD 1.5: 320)")
    parser.add_argument("--skip-presets", action="store_true", help="only the CPU validation")
    parser.add_argument("--engine-teacher", nargs="*", default=[],
                        help="teacher dirs to validate the engine's own run on too (native size)")
    parser.add_argument("--engine-only", action="store_true", help="only part 2, the engine's own runs")
    parser.add_argument("--sd3", action="store_true", help="the SD3 class instead: mid-size validation and presets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = [f"Machine: {machine()}."]
    if args.sd3:
        print("\n".join([*lines, "", *sd3_rows(), "", f"({time.perf_counter() - t0:.0f} s)"]))
        return 0
    if not args.engine_only:
        lines += ["", *validation_rows(args.width)]
    with tempfile.TemporaryDirectory() as tmp:
        lines += ["", *engine_rows(args.width, args.engine_teacher, Path(tmp))]
    if not (args.skip_presets or args.engine_only):
        lines += ["", *preset_rows()]
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
