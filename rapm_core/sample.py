"""``rapm sample``'s engine: a finished run's student as a user of its export gets it.

The run's teacher is loaded with stock ``from_pretrained``, the exported LoRA with stock
``load_lora_weights`` (fused, as evaluation deploys it), and it samples with the exported
scheduler at guidance 1 and the exported step count, through evaluation's own student sampler
(:func:`rapm_core.evaluate.samplers.run_sampler`). Image k of every prompt starts from the noise
evaluation gives its image k at the same seed (:func:`~rapm_core.evaluate.samplers.eval_seed`),
so an image depends on its prompt, its index and the seed only, never on how many were asked
for (a larger ``--batch-size`` changes CPU kernels' rounding, not the noise), and a column of the
contact sheet compares prompts on one noise.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from rapm_core.config import Device, Precision, StrictModel
from rapm_core.errors import ConfigError
from storage.atomic import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:  # torch and diffusers load only when a command samples, not when the CLI starts
    from rapm_core.evaluate.student import StudentExport
    from rapm_core.ode import StockSampler
    from storage.run_dir import RunDir

MAX_PROMPT_CHARS = 2000  # far beyond any tokenizer's window; a longer line is a wrong file, not a prompt
LORA_FILE = "pytorch_lora_weights.safetensors"
CONTACT_SHEET = "contact_sheet.png"


class SampleConfig(StrictModel):
    """Sample a finished run's exported student (LoRA + scheduler) in the stock pipeline of its teacher."""

    run: str = Field(description="run dir made by `rapm distill` (its export/ is the student)")
    prompt: list[str] = Field(default_factory=list, description="a prompt (repeat the option for more)")
    prompts: str | None = Field(None, description="a text file of prompts, one a line (blank lines skipped)")
    num_images: int = Field(4, ge=1, le=1000, description="images per prompt")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="noise seed: image k of every prompt starts from "
                                                         "evaluation's noise of its image k")
    steps: int | None = Field(None, ge=1, le=1000, description="sampling steps (default: the exported step count)")
    out: str = Field(description="directory for the PNGs, the contact sheet and sample.json")
    batch_size: int = Field(4, ge=1, le=1024, description="images per sampling batch (speed only)")
    dtype: Precision = Field("fp32", description="dtype the teacher is loaded in")
    device: Device = Field("auto", description="compute device")

    @field_validator("prompt")
    @classmethod
    def _prompts_have_text(cls, prompts: list[str]) -> list[str]:
        for p in prompts:
            _check_prompt(p, "--prompt")
        return prompts


def _check_prompt(text: str, where: str) -> str:
    if not text.strip():
        raise ValueError(f"{where}: an empty prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where}: a prompt of {len(text)} characters (at most {MAX_PROMPT_CHARS})")
    return text


def read_prompts(config: SampleConfig) -> list[str]:
    """``--prompt`` values, then the ``--prompts`` file's non-blank lines."""
    prompts = list(config.prompt)
    if config.prompts is not None:
        path = Path(config.prompts)
        if not path.is_file():
            raise ConfigError(f"{path}: no such prompt file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    prompts.append(_check_prompt(line, f"{path}:{n}"))
                except ValueError as err:
                    raise ConfigError(str(err)) from None
        if len(prompts) == len(config.prompt):
            raise ConfigError(f"{path}: no prompts in it")
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompts FILE")
    return prompts


@dataclass(frozen=True)
class SamplePlan:
    """What ``rapm sample`` checks before anything loads."""

    run: RunDir
    teacher: str
    teacher_revision: str | None
    student: StudentExport
    prompts: list[str]
    steps: int


def plan_sample(config: SampleConfig) -> SamplePlan:
    """The run's teacher and export and the prompts, or a ConfigError naming what is missing."""
    from rapm_core.evaluate.student import load_student_export
    from storage.run_dir import RunDir

    run = RunDir(config.run)
    if not run.path.is_dir():
        raise ConfigError(f"{config.run}: no such run dir")
    if not run.run_json.is_file():
        raise ConfigError(f"{config.run}: not a run dir (no run.json); run `rapm distill` first")
    try:
        record = json.loads(run.run_json.read_text(encoding="utf-8"))
        teacher = record["teacher"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{run.run_json}: unreadable (damaged or not written by rapm)") from None
    student = load_student_export(run.export_dir)
    if not (run.export_dir / LORA_FILE).is_file():
        raise ConfigError(f"{run.export_dir}: no {LORA_FILE}; run the same `rapm distill` again to export it")
    prompts = read_prompts(config)
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise ConfigError(f"{config.out}: a file, not a directory; choose another --out")
    return SamplePlan(run, teacher, record.get("teacher_revision"), student, prompts,
                      config.steps or student.num_steps)


def with_steps(sampler: "StockSampler", steps: int) -> "StockSampler":
    """The exported sampler at another step count; a rectified-flow student's ``sigmas=`` are
    re-cut for it, as its export cut them for N."""
    from dataclasses import replace

    from rapm_core.flow_grid import pre_shift_sigmas

    if steps == sampler.num_steps:
        return sampler
    kwargs = dict(sampler.timestep_kwargs)
    if "sigmas" in kwargs:
        kwargs["sigmas"] = pre_shift_sigmas(steps)
    return replace(sampler, num_steps=steps, timestep_kwargs=kwargs)


@dataclass(frozen=True)
class SampleResult:
    out: str
    images: list[str]  # PNG paths, prompt-major
    contact_sheet: str
    seconds: float  # sampling and decoding


def image_name(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index:03d}-image{image_index:03d}.png"


def png_bytes(image: np.ndarray) -> bytes:
    """A (H, W, 3) uint8 image as PNG; no metadata, so the same pixels give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def contact_sheet(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """(P, K, H, W, 3) → one image: a row per prompt, a column per image index."""
    p, k, h, w, _ = images.shape
    sheet = np.full((p * h + (p - 1) * gap, k * w + (k - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(p):
        for j in range(k):
            sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = images[i, j]
    return sheet


def sample_student(config: SampleConfig, plan: SamplePlan, log: Callable[[str], None] = print) -> SampleResult:
    """Sample every prompt ``num_images`` times and write the PNGs, the contact sheet and sample.json."""
    from rapm_core.conditioning import Conditioning
    from rapm_core.evaluate.measures import to_uint8
    from rapm_core.evaluate.samplers import SamplerSpec, eval_seed, run_sampler
    from rapm_core.teacher import decode_latents, encode_prompts, load_teacher, resolve_device, resolve_dtype
    from rapm_core.trajectories.chain import initial_noise

    device = resolve_device(config.device)
    k, student = config.num_images, plan.student
    teacher = load_teacher(plan.teacher, plan.teacher_revision, resolve_dtype(config.dtype), device,
                           **student.pipeline_call)  # the prompt encoding the student was trained on
    student.load_into(teacher.pipe)
    sampler = with_steps(student.sampler, plan.steps)
    spec = SamplerSpec("student", plan.steps, 1.0, f"{student.method.upper()} student {plan.steps} steps", sampler)
    log(f"sampling {len(plan.prompts)} prompts × {k} images: {spec.label}, {sampler.class_name}, on {device}")
    every = [p for p in plan.prompts for _ in range(k)]
    cond = reduce(Conditioning.cat, [encode_prompts(teacher, every[a:a + config.batch_size])
                                     for a in range(0, len(every), config.batch_size)])
    indices = list(range(k)) * len(plan.prompts)
    noise = initial_noise([eval_seed(config.seed, i) for i in indices], teacher.latent_shape, teacher.dtype, device)
    samples = run_sampler(spec, teacher.unet, teacher.scheduler_config,
                         lambda z: decode_latents(teacher.pipe.vae, z), noise, cond, None, config.batch_size,
                         step_seeds=[eval_seed(config.seed, i, "rapm-eval-steps") for i in indices])
    images = to_uint8(samples.images).permute(0, 2, 3, 1).numpy()
    out = Path(config.out)
    names = [image_name(j, i) for j in range(len(plan.prompts)) for i in range(k)]
    for name, image in zip(names, images):
        write_bytes_atomic(out / name, png_bytes(image))
    sheet = out / CONTACT_SHEET
    write_bytes_atomic(sheet, png_bytes(contact_sheet(images.reshape(len(plan.prompts), k, *images.shape[1:]))))
    write_json_atomic(out / "sample.json", {
        "run": str(plan.run.path), "export": str(student.directory), "teacher": plan.teacher, "method": student.method,
        "steps": plan.steps, "guidance": 1.0, "seed": config.seed, "dtype": config.dtype, "device": str(device),
        "prompts": [{"prompt": p, "images": names[j * k:(j + 1) * k]} for j, p in enumerate(plan.prompts)],
    })
    log(f"{samples.images_per_second:.3g} images/s")
    return SampleResult(str(out), [str(out / n) for n in names], str(sheet), samples.seconds)
