"""What the shapes evaluator's features reward: image statistics and distribution metrics of real
renders, their VAE round trip, the teacher's samplers and the students of the quality benchmark.

Run after ``benchmarks/quality.py`` (it reads that benchmark's run dirs):
``.venv/bin/python benchmarks/quality_features.py --work runs/quality-v5``. Prints a markdown table
(one row per image set, at eval seed 1000) for the reading in RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from quality_measure import Bench, image_statistics, renders_as_images  # noqa: E402
from rapm_core.evaluate.samplers import SamplerSamples, sampler_specs  # noqa: E402
from rapm_core.evaluate.student import load_student_export  # noqa: E402
from rapm_core.pipeline import PipelineConfig  # noqa: E402
from rapm_core.teacher import decode_latents  # noqa: E402
from rapm_shapes import evaluator as judge  # noqa: E402
from rapm_shapes.shapes import render_prompts  # noqa: E402

STATS = ("domain_fid", "domain_recall", "domain_precision", "acc_shape", "acc_colour", "acc_size", "acc_position",
         "saturation", "sharpness", "background", "feature_spread")


@torch.no_grad()
def vae_round_trip(bench: Bench) -> torch.Tensor:
    vae = bench.teacher.pipe.vae
    x = judge.images_from_uint8(bench.metric.real_uint8.permute(0, 2, 3, 1).numpy())
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return decode_latents(vae, z)


def row(bench: Bench, label: str, images: torch.Tensor) -> str:
    spec = sampler_specs(bench.schema.scheduler_config, 4, 8, 4.0, load_student_export_stub())["student"]
    scores = bench.metric.measure(SamplerSamples(spec, torch.zeros(1), images, 1.0))
    stats = {**scores, **image_statistics(images, bench.prompts, bench.metric.model)}
    return f"| {label} | " + " | ".join(f"{stats[k]:.3f}" if abs(stats[k]) < 10 else f"{stats[k]:.1f}"
                                         for k in STATS) + " |"


def load_student_export_stub():
    from rapm_core.evaluate.student import StudentExport
    from rapm_core.ode import StockSampler

    return StudentExport(Path("-"), StockSampler({"_class_name": "DDIMScheduler"}, 4), "rapm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/quality-v5")
    parser.add_argument("--num-images", type=int, default=320)
    parser.add_argument("--students", nargs="+", default=["rapm-s0", "pcm-s0", "lcm-s0", "adv-l1-s0"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work) / "n4"
    config = PipelineConfig.model_validate_json((Path(args.work) / "n4-config.json").read_text())
    bench = Bench(config, 1000, args.num_images)
    lines = ["| images | " + " | ".join(STATS) + " |", "|" + "---|" * (len(STATS) + 1)]
    other = render_prompts(bench.prompts, 1001, bench.metric.model.config["resolution"])
    lines.append(row(bench, "real renders of another seed", renders_as_images(np.asarray(other))))
    lines.append(row(bench, "VAE round trip of the renders", vae_round_trip(bench)))
    s = bench.schema
    specs = sampler_specs(s.scheduler_config, s.num_slots, s.steps_per_slot, s.guidance, load_student_export_stub())
    for name in ("teacher_ref", "teacher_ddim"):
        lines.append(row(bench, specs[name].label, bench.sample(specs[name], bench.teacher.scheduler_config).images))
    for run in args.students:
        export = work / "runs" / run / "export"
        if not export.is_dir():
            continue
        fresh = Bench(config, 1000, args.num_images)
        student = load_student_export(export)
        student.load_into(fresh.teacher.pipe)
        spec = sampler_specs(s.scheduler_config, s.num_slots, s.steps_per_slot, s.guidance, student)["student"]
        lines.append(row(bench, f"student {run}", fresh.sample(spec, fresh.teacher.scheduler_config).images))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
