"""The prepared CUDA check: what a CPU cannot measure, in one run of under 10 minutes on one GPU.

Sections, most important first; each is skipped (and says so) when the rest of ``--budget-s``
cannot hold it:

1. distillation: s/iteration and peak memory (``torch.cuda.max_memory_allocated``) of the
   real ``Trainer.train_step`` — RAPM with pointwise and adversarial losses, with and without
   gradient checkpointing, PCM adversarial and pointwise, LCM (each with its student passes per
   iteration, the unit the benchmarks compare methods in) — on an SD 1.5-sized UNet at 512² and an
   SDXL-sized one at 1024², and RAPM pointwise (with and without checkpointing) and PCM on SD3
   Medium- and SD3.5 Medium-sized transformers at 1024² (their adversarial rows are planned and
   checked against CPU runs; LCM is VP-only); random weights built from the published configs
   on the GPU, bf16 weights as ``rapm distill --weights-dtype bf16`` holds them, fp32 LoRA; next to ``rapm plan``'s prediction for the
   same setting;
   then RAPM's relative targets in one batched call against one call per slot (s/iteration of
   both, in turns, ``bench_relative_targets.py``'s comparison) at SD 1.5 size;
2. denoiser (UNet, SD3 transformer) call times at bf16 and fp16, batch 1 (what ``rapm plan
   --seconds-per-call`` takes) and the CFG batch of a 4-prompt trajectory batch, and trajectories/s;
3. Stage A's peak (text encoders, T5-XXL for SD3, and the denoiser on the GPU, N·M guided
   steps) vs the planner;
4. the fp16 store round trip: Stage A on the embedded teacher in fp16 on the GPU into a float16
   store, read back, equal to the same trajectories recomputed;
5. the CUDA-marked tests (``pytest -m cuda``).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Without CUDA it says so and exits 2;
``--smoke`` runs the same code on the CPU with a small architecture and the live-tensor counter
instead of ``max_memory_allocated`` (it checks the script, not any GPU's numbers).

Run: ``.venv/bin/python benchmarks/gpu_check.py [--out runs/gpu_check] [--budget-s 540] [--only sd3]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_common and gpu_check_machine, when imported rather than run

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_relative_targets import lockstep_seconds, summary  # noqa: E402
from gpu_check_machine import Budget, Machine  # noqa: E402
from rapm_core.conditioning import Conditioning  # noqa: E402
from rapm_core.denoiser import denoise  # noqa: E402
from planner import PlanConfig  # noqa: E402
from planner.architecture import Architecture, from_preset  # noqa: E402
from planner.engine import MethodConfig, Trainer, teacher_trajectories  # noqa: E402
from planner.meta_memory import module_tensors, optimizer_tensors  # noqa: E402
from planner.stages import STAGES, encode, stored_conditioning, training_inputs  # noqa: E402
from planner.validation import foreach_steps  # noqa: E402
from planner.validation import mid_size, mid_size_sd3  # noqa: E402
from rapm_core.ode import SlotGrid  # noqa: E402
from rapm_core.teacher import DTYPES  # noqa: E402

GiB = 2 ** 30
TRAJECTORY_BATCH = 4
LOSSES = {"pointwise": dict(loss_relative="pointwise", loss_absolute="pointwise"),
          "adversarial": dict(loss_relative="adversarial", loss_absolute="adversarial"),
          "pcm adversarial": dict(method="pcm", pcm_adversarial=True),
          "pcm": dict(method="pcm"), "lcm": dict(method="lcm")}
# Gradient checkpointing is measured for RAPM's losses; the peers run without it.
CHECKPOINTED = ("pointwise", "adversarial")
# Rough seconds per item on an A100/H100-class GPU (GPU work only; the planner's predictions
# run beforehand in parallel), used only to skip what the budget cannot hold.
COST_S = {"distill": {"sd15": 20, "sdxl": 45, "sd3-medium": 40, "sd35-medium": 45}, "relative_targets": {"sd15": 40},
          "calls": {"sd15": 15, "sdxl": 30, "sd3-medium": 30, "sd35-medium": 30},
          "stage_a": {"sd15": 20, "sdxl": 45, "sd3-medium": 60, "sd35-medium": 60}, "store": 40, "tests": 120}
# The architectures of each run (the smoke run's stand in for them at a CPU's size), and the
# SD3-class ones, whose rows here train RAPM's pointwise losses (the adversarial ones are planned
# and checked against CPU runs: benchmarks/RESULTS.md, "### SD3-class teachers").
KINDS = {False: ["sd15", "sdxl", "sd3-medium", "sd35-medium"], True: ["smoke", "smoke-sd3"]}
SD3_KINDS = ("sd3-medium", "sd35-medium", "smoke-sd3")


# -- the planner's predictions (CPU work, in parallel worker processes) ------------------------------
def plan_config(fields: dict) -> PlanConfig:
    """A PlanConfig from plain fields (picklable for the workers); ``method``: flat CLI names."""
    return PlanConfig(**{**fields, "method": MethodConfig.from_options(**fields.get("method", {}))})


def _predict(args: tuple[str, dict, str, dict]) -> int:
    stage, arch_spec, _label, config = args
    torch.set_num_threads(1)
    arch = _architecture(arch_spec)
    return STAGES[stage](arch, plan_config(config)).peak_bytes


def _architecture(spec: dict) -> Architecture:
    if spec["kind"] == "smoke":
        return mid_size(width=32)
    if spec["kind"] == "smoke-sd3":
        return mid_size_sd3()
    return from_preset(spec["kind"])


def _preset(kind: str) -> str:
    """The preset a kind's PlanConfig names (the smoke architectures are built from these layouts)."""
    return {"smoke": "sd15", "smoke-sd3": "sd35-medium"}.get(kind, kind)


def predictions(jobs: list[tuple[str, dict, str, dict]], workers: int) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    if workers <= 1:
        for job in jobs:
            out[job[2]] = _predict(job)
        return out
    # spawn: the parent may have initialised CUDA, which a forked child must not inherit.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, result in zip(jobs, pool.map(_predict, jobs)):
            out[job[2]] = result
    return out


# -- pieces --------------------------------------------------------------------------------------------
def _cond(arch: Architecture, batch: int, dtype: torch.dtype, device: torch.device) -> Conditioning:
    one = stored_conditioning(arch, dtype)

    def rows(t):
        return None if t is None else torch.randn(batch, *t.shape[1:]).to(device, dtype)

    return Conditioning(rows(one.prompt_embeds), rows(one.pooled_prompt_embeds), rows(one.time_ids))


def _footprint(box: dict) -> dict:
    """What the allocator reserved and what the device had in use (CUDA context included) at the
    block's end: what ``rapm plan --reserve`` has to cover beyond the tensors."""
    return {k: v for k, v in box.items() if k != "peak_bytes"}


def _resolution(arch: Architecture, smoke: bool) -> int:
    return 128 if smoke else arch.native_resolution


def distill_item(machine: Machine, arch: Architecture, config: PlanConfig, steps: int) -> dict:
    method, device = config.distill_method(), machine.device
    torch.manual_seed(0)
    unet = arch.build_denoiser(DTYPES[method.training.weights_dtype], device)
    scheduler = arch.scheduler_config()
    grid = SlotGrid.from_scheduler(scheduler, config.slots, config.steps_per_slot)
    example, teacher = training_inputs(arch, config, torch.randn)
    trainer = Trainer(unet, scheduler, grid, method, device=device, teacher=teacher)
    if machine.smoke:
        foreach_steps(trainer)  # CUDA's default, which the planner assumes
    gen = torch.Generator().manual_seed(0)
    for i in range(2):  # the first creates the AdamW states; from the second on it is steady
        trainer.train_step(example, gen, i)
    machine.sync()

    def resident():
        yield from module_tensors(trainer.unet, trainer.heads)
        yield from optimizer_tensors(trainer.g_optimizer, trainer.d_optimizer)
        yield from trainer.student.ode.tensors()

    with machine.peak(resident) as box:
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.train_step(example, gen, 1 + 2 * i)  # odd: LoRA steps under either schedule
        machine.sync()
        seconds = (time.perf_counter() - t0) / steps
    passes = trainer.method.student_passes()
    del trainer, unet
    machine.free()
    return {"measured_peak_bytes": box["peak_bytes"], "seconds_per_iteration": seconds,
            "student_passes": passes, **_footprint(box)}


def relative_targets_item(machine: Machine, arch: Architecture, config: PlanConfig, steps: int) -> dict:
    """s/iteration of ``Trainer.train_step`` with batched relative targets and with one call per slot."""
    method, device = config.distill_method(), machine.device
    scheduler = arch.scheduler_config()
    grid = SlotGrid.from_scheduler(scheduler, config.slots, config.steps_per_slot)
    example, teacher = training_inputs(arch, config, torch.randn)

    def make() -> Trainer:
        torch.manual_seed(0)
        unet = arch.build_denoiser(DTYPES[method.training.weights_dtype], device)
        return Trainer(unet, scheduler, grid, method, device=device, teacher=teacher)

    out = summary(lockstep_seconds(make, [example], steps + 1, machine.sync))
    machine.free()
    return {**out, "seconds_per_iteration": out["batched_s"]}


def unet_call_item(machine: Machine, arch: Architecture, precision: str, resolution: int, steps: int) -> dict:
    dtype, device = DTYPES[precision], machine.device
    torch.manual_seed(0)
    unet = arch.build_denoiser(dtype, device)
    c, h, w = arch.latent_shape(resolution)
    times = {}
    with torch.no_grad():
        for batch in (1, 2, 2 * TRAJECTORY_BATCH):
            x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
            cond = _cond(arch, batch, dtype, device)
            for _ in range(2):
                denoise(unet, x, 500, cond)
            machine.sync()
            reps = 3 if machine.smoke else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                denoise(unet, x, 500, cond)
            machine.sync()
            times[batch] = (time.perf_counter() - t0) / reps
    del unet
    machine.free()
    return {"seconds_per_call_batch1": times[1], "seconds_per_cfg_call_1_prompt": times[2],
            f"seconds_per_cfg_call_{TRAJECTORY_BATCH}_prompts": times[2 * TRAJECTORY_BATCH],
            "trajectories_per_s_batch1": 1 / (steps * times[2]),
            f"trajectories_per_s_batch{TRAJECTORY_BATCH}": TRAJECTORY_BATCH / (steps * times[2 * TRAJECTORY_BATCH])}


def stage_a_item(machine: Machine, arch: Architecture, config: PlanConfig) -> dict:
    dtype, device = DTYPES[config.precision], machine.device
    torch.manual_seed(0)
    unet, encoders = arch.build_denoiser(dtype, device), arch.build_text_encoders(dtype, device)
    grid = SlotGrid.from_scheduler(arch.scheduler_config(), config.slots, config.steps_per_slot)
    c, h, w = arch.latent_shape(config.resolution)
    noise = torch.randn(config.trajectory_batch, c, h, w, device=device, dtype=dtype)
    machine.free()
    with machine.peak(lambda: iter([*module_tensors(unet, *encoders), noise])) as box, torch.no_grad():
        t0 = time.perf_counter()
        cond = encode(arch, encoders, config.trajectory_batch, dtype, device)
        uncond = encode(arch, encoders, 1, dtype, device)
        z = teacher_trajectories(unet, arch.scheduler_config(), grid, noise, cond, uncond, config.guidance)
        host = z.detach().float().cpu()
        machine.sync()
        seconds = time.perf_counter() - t0
    del unet, encoders, z, host
    machine.free()
    return {"measured_peak_bytes": box["peak_bytes"], "seconds_per_batch": seconds, **_footprint(box),
            "trajectories_per_s": config.trajectory_batch / seconds}


def store_round_trip(machine: Machine) -> dict:
    """Stage A's own function on the embedded teacher, then the store read back vs a recomputation."""
    from bench_common import prompt_store
    from rapm_core.teacher import encode_prompts, encode_uncond, load_teacher
    from rapm_core.trajectories.chain import initial_noise
    from rapm_core.trajectories.config import TrajectoriesConfig
    from rapm_core.trajectories.generate import generate_trajectories
    from storage.trajectory_store import TrajectoryStore

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    precision = "fp32" if machine.smoke else "fp16"  # fp16 convolutions are a CUDA feature here
    with tempfile.TemporaryDirectory() as tmp:
        prompts = prompt_store(Path(tmp) / "prompts", 8)
        config = TrajectoriesConfig(prompts=str(prompts), teacher=str(ROOT / "assets" / "shapes-teacher"),
                                    out=str(Path(tmp) / "store"), dtype=precision, device=machine.device.type,
                                    store_dtype="float16", batch_size=4)
        t0 = time.perf_counter()
        generate_trajectories(config, log=lambda _m: None)
        seconds = time.perf_counter() - t0
        store = TrajectoryStore(config.out)
        teacher = load_teacher(config.teacher, None, DTYPES[precision], machine.device)
        grid = SlotGrid.from_scheduler(teacher.scheduler_config, config.slots, config.steps_per_slot)
        texts, seeds = store.prompts()[:4], store.seeds()[:4]
        noise = initial_noise(seeds, teacher.latent_shape, DTYPES[precision], machine.device)
        z = teacher_trajectories(teacher.unet, teacher.scheduler_config, grid, noise, encode_prompts(teacher, texts),
                                 encode_uncond(teacher), config.guidance)
        expected = z.float().cpu().numpy().astype("float16")
        stored = np.stack([np.asarray(store.read(i).positions) for i in range(4)])
    diff = float(np.abs(stored.astype(np.float32) - expected.astype(np.float32)).max())
    return {"precision": precision, "store_dtype": "float16", "trajectories": 8, "seconds": seconds,
            "max_abs_diff": diff, "equal": bool(np.array_equal(stored, expected))}


def cuda_tests(budget: Budget) -> dict:
    # Only the files that hold CUDA-marked tests: collecting the whole suite would import (and
    # need) every test's dependencies.
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text(encoding="utf-8"))
    # Neither the Prefect-stack nor the S3 plugin serves a CUDA test, and a GPU image may lack both.
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "-p", "no:prefect_stack", "-p", "no:s3_server", *files]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, budget.left() - 5))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "rc": None, "tail": "timed out within the budget"}
    return {"command": " ".join(cmd[1:]), "rc": done.returncode, "tail": (done.stdout + done.stderr)[-1500:]}


# -- the run -------------------------------------------------------------------------------------------
def plan_configs(smoke: bool) -> dict[str, tuple[dict, dict]]:
    """label → (architecture spec, PlanConfig fields) of every distillation and Stage A item, at
    each architecture's native resolution (SD3-class: 1024², the T5 token count of the smoke layout)."""
    items = {}
    for kind in KINDS[smoke]:
        losses_here = ({k: LOSSES[k] for k in ("pointwise", "pcm")} if kind in SD3_KINDS  # LCM is VP-only
                       else LOSSES)
        for loss, losses in losses_here.items():
            for ckpt in ((False, True) if loss in CHECKPOINTED else (False,)):
                method = {**losses, "gradient_checkpointing": ckpt}
                if smoke:
                    method["disc_channels"] = 32
                config = {"preset": _preset(kind), "precision": "bf16", "method": method,
                          "slots": 4, "steps_per_slot": 2 if smoke else 10}
                if smoke:
                    config.update(resolution=128, precision="fp32")
                items[f"distill {kind} {loss}{' ckpt' if ckpt else ''}"] = ({"kind": kind}, config)
    for kind in KINDS[smoke]:
        config = {"preset": _preset(kind), "precision": "fp32" if smoke else "bf16",
                  "batch_size": TRAJECTORY_BATCH}
        if smoke:
            config.update(resolution=128, steps_per_slot=2)
        items[f"stage A {kind}"] = ({"kind": kind}, config)
    for _spec, config in items.values():
        if _spec["kind"] == "smoke-sd3":
            config["max_sequence_length"] = mid_size_sd3().max_sequence_length
    return items


def selected(label: str, only: list[str] | None) -> bool:
    return not only or any(part in label for part in only)


def run(args: argparse.Namespace) -> dict:
    machine = Machine(args.smoke)
    budget = Budget(args.budget_s)
    results: dict = {"probe": machine.probe, "device": torch.cuda.get_device_name() if not args.smoke else "cpu",
                     "torch": torch.__version__, "budget_s": args.budget_s, "items": {}}
    items = {label: item for label, item in plan_configs(args.smoke).items() if selected(label, args.only)}
    jobs = [("distill" if label.startswith("distill") else "trajectories", spec, label, cfg)
            for label, (spec, cfg) in items.items()]
    t0 = time.perf_counter()
    predicted = predictions(jobs, 1 if args.smoke else args.jobs)
    results["planner_seconds"] = time.perf_counter() - t0

    def record(label: str, cost: float, fn: Callable[[], dict]) -> None:
        if not selected(label, args.only):
            return
        if not budget.holds(cost):
            results["items"][label] = {"skipped": f"budget: {budget.left():.0f} s left, needs ~{cost:.0f} s"}
            return
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # one failing item must not cost the others' numbers
            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
            machine.free()
        out["wall_s"] = time.perf_counter() - t
        if label in predicted and "measured_peak_bytes" in out:
            out["predicted_peak_bytes"] = predicted[label]
            out["ratio"] = predicted[label] / out["measured_peak_bytes"]
        results["items"][label] = out
        print(f"{label}: {json.dumps({k: v for k, v in out.items() if k != 'traceback'}, default=str)}", flush=True)

    for label, (spec, cfg) in items.items():
        if label.startswith("distill"):
            arch = _architecture(spec)
            record(label, COST_S["distill"].get(spec["kind"], 5),
                   lambda arch=arch, cfg=cfg: distill_item(machine, arch, plan_config(cfg), 1 if args.smoke else 3))
    kinds = KINDS[args.smoke]
    for kind in kinds[:1]:
        if f"distill {kind} pointwise" not in items:
            break
        spec, cfg = items[f"distill {kind} pointwise"]
        arch = _architecture(spec)
        record(f"batched relative targets {kind} pointwise", COST_S["relative_targets"].get(kind, 10),
               lambda arch=arch, cfg=cfg: relative_targets_item(machine, arch, plan_config(cfg), 2 if args.smoke else 6))
    for kind in kinds:
        arch = _architecture({"kind": kind})
        for precision in (["fp32"] if args.smoke else ["bf16", "fp16"]):
            record(f"denoiser calls {kind} {precision}", COST_S["calls"].get(kind, 5),
                   lambda arch=arch, precision=precision: unet_call_item(machine, arch, precision,
                                                                         _resolution(arch, args.smoke), 40))
    for kind in kinds:
        label = f"stage A {kind}"
        if label not in items:
            continue
        spec, cfg = items[label]
        arch = _architecture(spec)
        record(label, COST_S["stage_a"].get(kind, 5), lambda arch=arch, cfg=cfg: stage_a_item(machine, arch,
                                                                                                plan_config(cfg)))
    record("fp16 store round trip", COST_S["store"], lambda: store_round_trip(machine))
    if args.smoke:
        results["items"]["cuda tests"] = {"skipped": "smoke run on CPU"}
    else:
        record("cuda tests", COST_S["tests"], lambda: cuda_tests(budget))
    results["wall_s"] = args.budget_s - budget.left()
    return results


def _num(value: float | None, unit: float, digits: int = 2) -> str:
    return "—" if value is None else f"{value / unit:.{digits}f}"


def markdown(results: dict) -> str:
    lines = [f"# GPU check ({results['device']}, torch {results['torch']})", "",
             f"Peak memory: {results['probe']}; planner predictions took {results['planner_seconds']:.0f} s; "
             f"whole check {results['wall_s']:.0f} s of a {results['budget_s']:.0f} s budget.", "",
             "| item | measured peak GiB | planner GiB | planner / measured | s/iteration or s | other |",
             "|---|---|---|---|---|---|"]
    for label, item in results["items"].items():
        if "skipped" in item or "error" in item:
            lines.append(f"| {label} | — | — | — | — | {item.get('skipped') or item.get('error')} |")
            continue
        measured = item.get("measured_peak_bytes")
        predicted = item.get("predicted_peak_bytes")
        secs = item.get("seconds_per_iteration", item.get("seconds_per_batch", item.get("seconds")))
        other = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in item.items()
                 if k not in ("measured_peak_bytes", "predicted_peak_bytes", "ratio", "seconds_per_iteration",
                              "seconds_per_batch", "seconds", "wall_s", "tail")}
        cells = [label, _num(measured, GiB), _num(predicted, GiB), _num(item.get("ratio"), 1, 3), _num(secs, 1, 3),
                 json.dumps(other)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget; items that would not fit are skipped (default: 540)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes computing the planner's predictions in parallel")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the items whose label contains TEXT (repeatable; e.g. --only sd3)")
    parser.add_argument("--smoke", action="store_true",
                        help="run everything on the CPU with a small architecture (checks the script only)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing measured. Run it on a machine with one CUDA GPU, or pass --smoke to check the script on CPU.",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(results), encoding="utf-8")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
