"""``rapm plan``: the published presets, what fits, the advice, teacher dirs, bad input, and the
planner against a real CPU run of the same stage."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import main
from rapm_core.distill.config import MethodConfig
from planner import PlanConfig
from planner.advice import GiB
from planner.architecture import from_preset, from_teacher, parameter_count
from planner.config import EVAL_BATCH, EVAL_IMAGES, TRAJECTORY_BATCH
from planner.meta_memory import MemoryCounter
from planner.planner import store_bytes
from planner.stages import distill, trajectories
from planner.validation import compare, compare_run, mid_size
from test_plan_sd3 import SD35_COMMAND

ROOT = Path(__file__).resolve().parents[1]
SHAPES_TEACHER = ROOT / "assets" / "shapes-teacher"


SD15_COMMAND = "rapm plan --preset sd15 --precision bf16 --gradient-checkpointing --gpu-memory 8 --json"
SDXL_COMMAND = "rapm plan --preset sdxl --loss-relative adversarial --loss-absolute adversarial --gpu-memory 24"
SHAPES_COMMAND = "rapm plan --teacher assets/shapes-teacher"
DOCUMENTED = (SD15_COMMAND, SDXL_COMMAND, SHAPES_COMMAND, SD35_COMMAND)  # SD35: tests/test_plan_sd3.py


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_json(argv: list[str], capsys) -> dict:
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    return json.loads(out)


def fits(row: str) -> str:
    return re.search(r"\s(yes|no)\s", row + " ").group(1)


def readme_commands() -> list[list[str]]:
    """The ``rapm plan`` commands the README's planner section documents, as argv lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Plan memory and time before you run"):]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    return [line.split()[1:] for line in section.splitlines() if line.startswith("rapm plan")]


# -- presets ----------------------------------------------------------------------------------------
def test_presets_build_the_published_parameter_counts():
    sd15, sdxl = from_preset("sd15"), from_preset("sdxl")
    assert abs(parameter_count(sd15.build_denoiser(torch.float32)) - 859.5e6) < 1e6
    assert abs(parameter_count(sdxl.build_denoiser(torch.float32)) - 2.567e9) < 2e6
    clip_l, = sd15.build_text_encoders(torch.float32)
    assert abs(parameter_count(clip_l) - 123.1e6) < 0.5e6
    _, clip_g = sdxl.build_text_encoders(torch.float32)
    assert abs(parameter_count(clip_g) - 694.7e6) < 1e6
    assert abs(parameter_count(sdxl.build_vae(torch.float32)) - 83.65e6) < 0.5e6
    assert (sd15.native_resolution, sdxl.native_resolution) == (512, 1024)
    assert (sdxl.pooled_dim, sdxl.embed_dim, sd15.embed_dim, sd15.text_length) == (1280, 2048, 768, 77)


def test_plan_defaults_are_the_stages_defaults():
    from rapm_core.distill.config import DistillRunConfig
    from rapm_core.evaluate.config import EvaluateConfig
    from rapm_core.trajectories.config import TrajectoriesConfig

    traj, ev = TrajectoriesConfig.model_fields, EvaluateConfig.model_fields
    assert traj["batch_size"].default == TRAJECTORY_BATCH and ev["batch_size"].default == EVAL_BATCH
    assert ev["num_images"].default == EVAL_IMAGES
    plan = PlanConfig.model_fields
    for name in ("slots", "steps_per_slot", "guidance"):  # the trajectories' own fields: default, bounds, help
        assert repr(plan[name]) == repr(traj[name]), name
    assert plan["precision"].default == traj["dtype"].default
    # The method is rapm distill's own model: same sections, same defaults.
    assert plan["method"].annotation is MethodConfig
    assert PlanConfig(preset="sd15").distill_method() == DistillRunConfig(trajectories="S", out="R").method_config()


def test_method_options_are_rapm_distills(capsys):
    """`rapm plan` takes `rapm distill`'s method flags; --weights-dtype follows --precision unless given."""
    base = ["plan", "--preset", "sd15", "--json"]
    default = plan_json(base, capsys)
    assert default["method"]["training"]["weights_dtype"] == "fp32"
    bf16 = plan_json(base + ["--precision", "bf16"], capsys)
    assert bf16["method"]["training"]["weights_dtype"] == "bf16"
    mixed = plan_json(base + ["--weights-dtype", "fp32", "--precision", "bf16", "--disc-schedule", "alternate",
                              "--lambda-adv", "0.1"], capsys)
    assert mixed["method"]["training"]["weights_dtype"] == "fp32"
    assert mixed["method"]["adversarial"] == {**default["method"]["adversarial"], "disc_schedule": "alternate",
                                              "lambda_adv": 0.1}
    # The distillation plan holds what the engine holds: fp32 weights there, whatever --precision says.
    assert mixed["stages"]["distill"]["weights_bytes"] == default["stages"]["distill"]["weights_bytes"]
    assert bf16["stages"]["distill"]["weights_bytes"] * 2 == default["stages"]["distill"]["weights_bytes"]
    autocast = plan_json(base + ["--mixed-precision", "bf16"], capsys)["stages"]["distill"]
    assert autocast["resident"]["unet"] == default["stages"]["distill"]["resident"]["unet"]
    assert autocast["resident"]["autocast_copies"] == bf16["stages"]["distill"]["resident"]["unet"]


# -- the targets ------------------------------------------------------------------------------------
def test_sd15_bf16_checkpointed_distillation_fits_8gb(capsys):
    argv = SD15_COMMAND.split()[1:]
    assert argv in readme_commands()
    result = plan_json(argv, capsys)
    stages = result["stages"]
    assert set(stages) == {"trajectories", "distill", "evaluate"}
    assert all(stages[s]["peak_bytes"] > stages[s]["weights_bytes"] > 0 for s in stages)
    assert stages["distill"]["fits"] is True and stages["distill"]["peak_bytes"] < 8 * GiB
    assert stages["trajectories"]["fits"] is True
    # The trajectory figure decodes one latent at a time (it decoded 3·(N+1) at once, 7.6 GiB):
    # the evaluation's peak is the sampling batch's decode, which --batch-size sets.
    evaluate = stages["evaluate"]
    assert evaluate["phases"]["trajectory figure decode"] < 0.6 * evaluate["phases"]["decode"]
    assert evaluate["peak_phase"] == "decode"
    if not evaluate["fits"]:
        assert evaluate["advice"]["flags"].startswith("--batch-size")
        assert evaluate["advice"]["peak_bytes"] <= result["limit_bytes"]
    assert result["teacher"]["denoiser_parameters"] == 859520964
    assert result["time"]["estimate"] is True and result["time"]["total_s"] > 0


def test_advice_names_an_sdxl_setting_that_fits_24gb(capsys):
    """The paper's adversarial losses at fp32 do not fit 24 GB for distillation; the advice names
    a setting that does, planned again (its peak is in the row)."""
    argv = SDXL_COMMAND.split()[1:]
    assert argv in readme_commands()
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[2:5]}
    assert set(rows) == {"trajectories", "distill", "evaluate"}
    assert fits(rows["distill"]) == "no"
    advised = re.search(r"(--\S+(?: \S+)*) \(([\d.]+) GiB\)", rows["distill"])
    assert advised and float(advised.group(2)) <= 24 - PlanConfig.model_fields["reserve"].default
    assert fits(rows["trajectories"]) == "yes"


def test_checkpointing_lowers_the_distillation_peak_and_bf16_halves_the_weights():
    arch = from_preset("sd15")
    plain = distill(arch, PlanConfig(preset="sd15", precision="bf16"))
    ckpt = distill(arch, PlanConfig(preset="sd15", precision="bf16",
                                    method=MethodConfig.from_options(gradient_checkpointing=True)))
    assert ckpt.peak_bytes < 0.8 * plain.peak_bytes
    assert ckpt.weights_bytes == plain.weights_bytes
    fp32 = trajectories(arch, PlanConfig(preset="sd15", precision="fp32"))
    bf16 = trajectories(arch, PlanConfig(preset="sd15", precision="bf16"))
    assert bf16.weights_bytes / fp32.weights_bytes == pytest.approx(0.5, abs=0.01)
    assert bf16.peak_bytes < 0.6 * fp32.peak_bytes
    # Stage A never decodes: the VAE stays in host memory (rapm_core.trajectories.generate).
    assert set(fp32.resident) == {"unet", "text_encoders"}


# -- teachers from config files ---------------------------------------------------------------------
@pytest.mark.parametrize("teacher", ["tiny_sd15_dir", "tiny_sdxl_dir"])
def test_teacher_dir_is_planned_from_its_config_files(teacher, request, capsys):
    directory = request.getfixturevalue(teacher)
    result = plan_json(["plan", "--teacher", str(directory), "--gpu-memory", "4", "--json"], capsys)
    arch = from_teacher(str(directory))
    assert result["teacher"]["kind"] == arch.kind == ("sdxl" if "sdxl" in teacher else "sd15")
    assert all(s["fits"] and s["peak_bytes"] > s["weights_bytes"] for s in result["stages"].values())
    c, h, w = result["latent_shape"]
    conditioning = arch.text_length * arch.embed_dim * 4 + (0 if arch.pooled_dim is None else (arch.pooled_dim + 6) * 4)
    assert result["store"]["bytes_per_trajectory"] == (4 * 10 + 1) * c * h * w * 2 + conditioning


def test_peers_are_planned(tiny_sd15_dir, capsys):
    base = ["plan", "--teacher", str(tiny_sd15_dir), "--json"]
    lcm = plan_json(base + ["--method", "lcm"], capsys)["stages"]["distill"]
    pcm = plan_json(base + ["--method", "pcm", "--pcm-adversarial"], capsys)["stages"]["distill"]
    assert "heads" in pcm["resident"] and pcm["resident"]["heads"] > 0 and "heads" not in lcm["resident"]
    assert pcm["peak_bytes"] > lcm["peak_bytes"]
    assert all(s["resident"]["uncond"] > 0 for s in (lcm, pcm))  # the peers' own guided teacher step


def test_embedded_teacher_command_runs_as_documented(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented path is relative to the repository
    argv = SHAPES_COMMAND.split()[1:]
    assert argv in readme_commands()
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith(str(SHAPES_TEACHER))
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["trajectories", "distill", "evaluate"]


def test_every_documented_command_has_its_test():
    assert sorted(map(" ".join, readme_commands())) == sorted(c.split(" ", 1)[1] for c in DOCUMENTED)


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["plan", "--preset", "foo"],
    ["plan", "--teacher", "/nonexistent/teacher-dir"],
    ["plan", "--teacher", str(SHAPES_TEACHER), "--preset", "sd15"],
    ["plan"],
    ["plan", "--preset", "sd15", "--loss-relative", "off", "--loss-absolute", "off"],
    ["plan", "--preset", "sd15", "--resolution", "500"],
])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("rapm plan: error:")


# -- the counter and the validation -----------------------------------------------------------------
def test_counter_counts_storages_once_and_frees_them():
    counter = MemoryCounter("cpu")
    with counter:
        a = torch.ones(1024)  # 4 KiB
        view = a[:10]
        a.add_(1)
        b = a * 2
        assert counter.live == 8192
        del a, view, b
    assert counter.live == 0 and counter.peak == 8192
    meta = MemoryCounter("meta")
    with meta:
        x = torch.ones(4, device="meta")
        assert bool(torch.isfinite(x).all()) is True and float(x.sum()) == 1.0
        assert x.cpu().shape == (4,) and meta.live >= 16


@pytest.mark.parametrize("stage, method", [
    ("distill", {}),
    ("distill", {"loss_relative": "adversarial", "loss_absolute": "adversarial", "disc_channels": 32,
                 "gradient_checkpointing": True}),
    ("distill", {"method": "pcm", "pcm_adversarial": True, "disc_channels": 32, "disc_schedule": "alternate"}),
    ("distill", {"method": "lcm", "weights_dtype": "bf16"}),
    ("trajectories", {}),
])
def test_planner_is_within_15_percent_of_a_real_cpu_run(stage, method):
    arch = mid_size(width=32)
    config = PlanConfig(preset="sd15", resolution=256, slots=2, steps_per_slot=2, batch_size=2,
                        method=MethodConfig.from_options(**method))
    result = compare(stage, arch, config)
    assert 0.85 <= result["ratio_live"] <= 1.15, result


def test_planner_predicts_the_engines_bf16_weights_run(tmp_path, tiny_sd15_dir, make_store):
    """`rapm distill --weights-dtype bf16` as the engine builds it (build_trainer loads the store's
    teacher UNet in bf16), one stored trajectory, against the plan made from the teacher's configs."""
    store = make_store(tmp_path, tiny_sd15_dir, num=1)
    result = compare_run(str(store), MethodConfig.from_options(weights_dtype="bf16", loss_relative="both",
                                                               disc_channels=8))
    assert 0.85 <= result["ratio_live"] <= 1.15, result


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [{}, {"loss_relative": "adversarial", "loss_absolute": "adversarial",
                                         "gradient_checkpointing": True}, {"method": "pcm", "pcm_adversarial": True}])
def test_planner_is_within_15_percent_of_max_memory_allocated(method):
    from planner.engine import Trainer
    from planner.stages import training_inputs
    from rapm_core.ode import SlotGrid

    arch = from_preset("sd15")
    config = PlanConfig(preset="sd15", precision="bf16", resolution=256, slots=2, steps_per_slot=2,
                        method=MethodConfig.from_options(**method))
    predicted = distill(arch, config).peak_bytes
    scheduler = arch.scheduler_config()
    grid = SlotGrid.from_scheduler(scheduler, 2, 2)
    example, teacher = training_inputs(arch, config, torch.randn)
    trainer = Trainer(arch.build_denoiser(torch.bfloat16, "cuda"), scheduler, grid, config.distill_method(),
                      device="cuda", teacher=teacher)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        trainer.train_step(example, gen, i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.train_step(example, gen, 1)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    assert 0.85 <= predicted / measured <= 1.15, (predicted, measured)


def test_store_bytes_follow_the_layout():
    arch = from_preset("sdxl")
    store = store_bytes(arch, PlanConfig(preset="sdxl"))
    assert store["positions_bytes"] == 41 * 4 * 128 * 128 * 2
    assert store["conditioning_bytes"] == (77 * 2048 + 1280 + 6) * 4


# -- the GPU check --------------------------------------------------------------------------------
def test_gpu_check_imports_and_explains_itself_without_cuda(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.plan_configs(smoke=False)
    with pytest.raises(SystemExit) as help_exit:  # its --help, parsed by the module just loaded
        module.main(["--help"])
    assert help_exit.value.code == 0 and "--budget-s" in capsys.readouterr().out
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]
    if not torch.cuda.is_available():
        bare = subprocess.run(script, capture_output=True, text=True, timeout=120)
        assert bare.returncode == 2 and "no CUDA device" in bare.stderr
