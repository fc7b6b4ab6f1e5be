"""SD 1.5- and SDXL-architecture dry runs on CPU: random weights, the real CLI end to end.

Builds a teacher directory of the published architecture (``planner.presets``; random
weights, offline character tokenizers: ``rapm_testing.random_pipeline``), then runs the
stages as a user does, each as its own ``python -m flows.cli`` process: ingest, trajectories
at the teacher's latent size (SDXL with its pooled embeddings and time ids), ``store inspect``,
a few distillation iterations of the default method, evaluation of a handful of images — and a
stock ``StableDiffusion(XL)Pipeline.from_pretrained(teacher)`` + ``load_lora_weights(export)``
making an image. Measured per process: wall time and peak RSS (sampled every 0.2 s); from the
outputs: s/iteration (``metrics.jsonl``), store bytes per trajectory (``store inspect``), and s
per UNet call (``call``: the teacher UNet loaded as ``rapm distill`` loads it, one forward at
batch 1 and at the CFG batch 2, and optionally one at another resolution).

The UNet is always the published one at full size; what may be shrunk, and is then recorded in
the results: the weights' dtype (``--dtype bf16``: trajectories' ``--dtype`` and distillation's
``--weights-dtype``), the text encoders' depth (``--text-layers``), the resolution of the
end-to-end run (``--resolution``: the teacher dir's ``sample_size``; SDXL at 512² beside one
timed 1024² call, ``--timed-call 1024``), the teacher steps per slot and the slots trained per
iteration. ``--reduced`` swaps in the preset's block layout at width 32 (minutes, for checking
the script). Too slow for CI; the commands and their numbers are in benchmarks/RESULTS.md:

    .venv/bin/python benchmarks/sd_dry_run.py run --preset sd15 --reduced --work runs/dry/sd15-mini
    nice -n 19 .venv/bin/python benchmarks/sd_dry_run.py run --preset sd15 --work runs/dry/sd15
    nice -n 19 .venv/bin/python benchmarks/sd_dry_run.py run --preset sdxl --resolution 512 --dtype bf16 \\
        --slots 2 --steps-per-slot 2 --trajectories 1 --batch-size 1 --iterations 1 --eval-images 1 \\
        --timed-call 1024 --work runs/dry/sdxl
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

GiB = 2 ** 30
PROMPTS = ["a red circle on a white table", "two blue squares in the snow", "a green triangle above the sea",
           "an orange cat on a sofa", "a lighthouse at dusk", "a bowl of ripe lemons", "a bicycle in the rain",
           "a small boat on a calm lake"]


# -- one measured process ----------------------------------------------------------------------------
def measured(name: str, argv: list[str], work: Path, env: dict, min_available: float) -> dict:
    """Run ``argv``; its wall time, exit code, output tail, peak RSS of the process and of its tree
    (the CLI's temporary Prefect server included). Stopped (its own process group only) when the
    machine's available memory falls below ``min_available`` GiB."""
    log, stdout = work / f"{name}.log", work / f"{name}.out"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as err, open(stdout, "w", encoding="utf-8") as out:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        peak = {"rss": 0, "tree": 0, "low_memory": False}

        def watch() -> None:
            proc = psutil.Process(child.pid)
            while child.poll() is None:
                try:
                    rss = proc.memory_info().rss
                    tree = rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    break
                peak["rss"], peak["tree"] = max(peak["rss"], rss), max(peak["tree"], tree)
                if psutil.virtual_memory().available < min_available * GiB:
                    peak["low_memory"] = True
                    os.killpg(child.pid, signal.SIGTERM)
                    break
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = child.wait()
        watcher.join()
    tail = (stdout.read_text(encoding="utf-8", errors="replace") + log.read_text(encoding="utf-8", errors="replace"))
    result = {"argv": argv[1:], "rc": rc, "wall_s": time.perf_counter() - t0, "peak_rss_bytes": peak["rss"],
              "peak_rss_tree_bytes": peak["tree"], "stopped_low_memory": peak["low_memory"], "stdout": str(stdout)}
    print(f"{name}: rc {rc}, {result['wall_s']:.0f} s, peak RSS {peak['rss'] / GiB:.2f} GiB", flush=True)
    if rc != 0:
        result["tail"] = tail[-1500:]
    return result


# -- the pieces run in their own processes ------------------------------------------------------------
def unet_calls(args: argparse.Namespace) -> dict:
    """Seconds of teacher UNet forwards (no grad), the UNet loaded as ``rapm distill`` loads it."""
    from planner.architecture import from_teacher
    from planner.stages import stored_conditioning
    from rapm_core.teacher import DTYPES, load_unet

    dtype = DTYPES[args.dtype]
    arch = from_teacher(args.teacher)
    unet = load_unet(args.teacher, dtype=dtype)
    c, h, w = arch.latent_shape(args.resolution)
    out = {"resolution": args.resolution or arch.native_resolution, "dtype": args.dtype}
    with torch.no_grad():
        for batch in args.batches:
            cond = stored_conditioning(arch, dtype, torch.randn)
            cond = cond[[0] * batch]
            x = torch.randn(batch, c, h, w, dtype=dtype)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                unet(x, 500, **cond.unet_kwargs())
                times.append(time.perf_counter() - t0)
            out[f"seconds_batch{batch}"] = times
    return out


def stock(args: argparse.Namespace) -> dict:
    """The export as a user loads it: stock pipeline, ``load_lora_weights``, the exported scheduler."""
    from diffusers import DiffusionPipeline, SchedulerMixin
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from rapm_core.teacher import DTYPES

    import diffusers

    pipe = DiffusionPipeline.from_pretrained(args.teacher, dtype=DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.export)
    exported = load_file(Path(args.export) / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    sched_cfg = json.loads((Path(args.export) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_cls: type[SchedulerMixin] = getattr(diffusers, sched_cfg["_class_name"])
    pipe.scheduler = scheduler_cls.from_pretrained(args.export, subfolder="scheduler")
    steps = json.loads((Path(args.export) / "inference.json").read_text())["num_inference_steps"]
    t0 = time.perf_counter()
    image = pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=1.0, output_type="pil",
                 generator=torch.Generator().manual_seed(0)).images[0]
    seconds = time.perf_counter() - t0
    image.save(args.out)
    extrema = image.getextrema()
    return {"pipeline": type(pipe).__name__, "exported_tensors": len(exported), "loaded_tensors": len(loaded),
            "image": args.out, "size": list(image.size), "extrema": extrema, "seconds": seconds, "steps": steps}


# -- the run -------------------------------------------------------------------------------------------
def teacher_architecture(args: argparse.Namespace):
    from planner.architecture import from_preset
    from rapm_testing.random_pipeline import with_text_layers
    from planner.validation import mid_size

    arch = mid_size(width=32, text_dim=64, preset=args.preset) if args.reduced else from_preset(args.preset)
    if args.resolution:
        arch = replace(arch, denoiser={**arch.denoiser, "sample_size": args.resolution // arch.vae_scale_factor})
    return with_text_layers(arch, args.text_layers)


def _stdout_json(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run(args: argparse.Namespace) -> dict:
    from planner.architecture import parameter_count
    from rapm_testing.random_pipeline import save_random_pipeline
    from rapm_core.teacher import DTYPES

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    arch = teacher_architecture(args)
    teacher = work / "teacher"
    results: dict = {"preset": args.preset, "reduced": args.reduced, "architecture": arch.source,
                     "resolution": arch.native_resolution, "dtype": args.dtype, "text_layers": args.text_layers,
                     "slots": args.slots, "steps_per_slot": args.steps_per_slot, "trajectories": args.trajectories,
                     "iterations": args.iterations, "slots_per_iteration": args.slots_per_iteration,
                     "eval_images": args.eval_images, "torch_threads": torch.get_num_threads(), "steps": {}}
    previous = work / "results.json"
    if args.only and previous.is_file():  # a partial rerun keeps the other steps' numbers
        results["steps"] = json.loads(previous.read_text(encoding="utf-8"))["steps"]
    t0 = time.perf_counter()
    if not (teacher / "model_index.json").is_file():
        save_random_pipeline(arch, teacher, DTYPES[args.dtype])
    results["build_s"] = time.perf_counter() - t0
    unet = arch.build_denoiser(torch.float32)
    results["unet_parameters"] = parameter_count(unet)
    results["text_encoder_parameters"] = [parameter_count(e) for e in arch.build_text_encoders(torch.float32)]
    del unet

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(work / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    cli = [sys.executable, "-m", "flows.cli"]
    me = [sys.executable, str(Path(__file__).resolve())]
    store, run_dir = work / "trajectories.zarr", work / "run"
    prompts_txt = work / "prompts.txt"
    prompts_txt.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    eval_prompts = max(1, min(len(PROMPTS) - args.trajectories, args.eval_images))
    steps = [
        ("ingest", cli + ["ingest", str(prompts_txt), "--out", str(work / "prompts"),
                          "--eval-fraction", f"{eval_prompts / len(PROMPTS):.3f}"]),
        ("unet_call", me + ["call", "--teacher", str(teacher), "--dtype", args.dtype, "--batches", "1", "2",
                            "--repeats", "2"]),
        ("trajectories", cli + ["trajectories", "--prompts", str(work / "prompts"), "--teacher", str(teacher),
                                "--out", str(store), "--slots", str(args.slots), "--steps-per-slot",
                                str(args.steps_per_slot), "--dtype", args.dtype, "--device", "cpu",
                                "--batch-size", str(args.batch_size), "--limit", str(args.trajectories)]),
        ("store_inspect", cli + ["store", "inspect", str(store), "--json"]),
        ("distill", cli + ["distill", "--trajectories", str(store), "--out", str(run_dir), "--iterations",
                           str(args.iterations), "--checkpoint-every", str(args.iterations), "--device", "cpu",
                           "--weights-dtype", args.dtype, "--slots-per-iteration", args.slots_per_iteration,
                           *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]),
        ("stock_lora", me + ["stock", "--teacher", str(teacher), "--export", str(run_dir / "export"),
                             "--dtype", args.dtype, "--out", str(work / "stock_lora.png")]),
        ("evaluate", cli + ["evaluate", "--run", str(run_dir), "--num-images", str(args.eval_images),
                            "--batch-size", str(args.eval_batch), "--evaluator", "none", "--device", "cpu"]),
    ]
    if args.timed_call:
        steps.insert(2, ("unet_call_timed", me + ["call", "--teacher", str(teacher), "--dtype", args.dtype,
                                                  "--resolution", str(args.timed_call), "--batches", "1",
                                                  "--repeats", "1"]))
    for name, argv in steps:
        if args.only and name not in args.only:
            continue
        step = results["steps"][name] = measured(name, argv, work, env, args.min_available_gib)
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        if step["rc"] != 0:
            break
        if name in ("unet_call", "unet_call_timed", "store_inspect", "stock_lora"):
            step["result"] = _stdout_json(step["stdout"])
    _summarise(results, run_dir)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return results


def _summarise(results: dict, run_dir: Path) -> None:
    steps = results["steps"]
    if "store_inspect" in steps and "result" in steps["store_inspect"]:
        info = steps["store_inspect"]["result"]
        results["store_bytes_per_trajectory"] = info["bytes_on_disk"] / max(info["complete"], 1)
        results["store_compression_ratio"] = info["compression_ratio"]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
        results["seconds_per_iteration"] = seconds
    if "trajectories" in steps and steps["trajectories"]["rc"] == 0:
        results["trajectory_stage_s_per_trajectory"] = steps["trajectories"]["wall_s"] / results["trajectories"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="build the teacher and run every stage")
    r.add_argument("--preset", choices=["sd15", "sdxl"], required=True)
    r.add_argument("--work", required=True, help="work directory (teacher, stores, run dir, logs, results.json)")
    r.add_argument("--reduced", action="store_true", help="the preset's layout at width 32 (checks the script)")
    r.add_argument("--resolution", type=int, help="teacher's native px for the end-to-end run (default: published)")
    r.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="teacher weights: trajectories --dtype and distill --weights-dtype")
    r.add_argument("--text-layers", type=int, help="cut each text encoder to this many layers (default: published)")
    r.add_argument("--slots", type=int, default=4)
    r.add_argument("--steps-per-slot", type=int, default=10)
    r.add_argument("--trajectories", type=int, default=2)
    r.add_argument("--batch-size", type=int, default=2, help="trajectory batch")
    r.add_argument("--iterations", type=int, default=2)
    r.add_argument("--slots-per-iteration", choices=["all", "random"], default="all")
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.add_argument("--eval-images", type=int, default=2)
    r.add_argument("--eval-batch", type=int, default=1)
    r.add_argument("--timed-call", type=int, help="also time one batch-1 UNet call at this resolution (px)")
    r.add_argument("--only", nargs="+", help="run only these steps (the work dir keeps the others' outputs)")
    r.add_argument("--min-available-gib", type=float, default=2.0,
                   help="stop a step when the machine's available memory falls below this")
    c = sub.add_parser("call", help="time teacher UNet forwards (prints one JSON line)")
    c.add_argument("--teacher", required=True)
    c.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    c.add_argument("--resolution", type=int)
    c.add_argument("--batches", type=int, nargs="+", default=[1])
    c.add_argument("--repeats", type=int, default=2)
    s = sub.add_parser("stock", help="stock pipeline + load_lora_weights + one image (prints one JSON line)")
    s.add_argument("--teacher", required=True)
    s.add_argument("--export", required=True)
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "run" and args.eval_images < 2:
        parser.error("--eval-images must be at least 2 (a distance between image sets needs two)")
    if args.command == "run":
        results = run(args)
        print(json.dumps({k: v for k, v in results.items() if k != "steps"}, default=str))
        return 0 if all(s["rc"] == 0 for s in results["steps"].values()) else 1
    print(json.dumps(unet_calls(args) if args.command == "call" else stock(args), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
