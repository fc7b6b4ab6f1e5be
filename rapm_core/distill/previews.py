"""Previews while a run trains: at every checkpoint, the student's samples of the first eval
prompts from fixed noise, beside the teacher's N·M-step reference of the same prompt and noise.

Distillation loads no text encoder, so the prompts are encoded once, when a run first starts,
with the teacher's own pipeline, which also samples the reference; both are kept in
``RUN/previews/conditioning.safetensors``, so a resumed run loads only the VAE. The noise is
evaluation's image i at seed 0 (:func:`rapm_core.evaluate.samplers.eval_seed`) and the student
samples through evaluation's sampler with the scheduler and step count it will be exported with.

Writing a preview must not change what training computes: it draws no random number from any
generator the run uses (the global RNG is forked around it), only reads the LoRA, and runs
without gradients, so a run with previews is bit-identical to one without.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load, save

from rapm_core.conditioning import Conditioning
from rapm_core.distill.trainer import Trainer
from rapm_core.evaluate.measures import to_uint8
from rapm_core.evaluate.samplers import SamplerSpec, eval_seed, sample_latents
from rapm_core.sample import contact_sheet, png_bytes
from rapm_core.teacher import (
    decode_latents, encode_prompts, encode_uncond, latent_shape, load_store_teacher, load_vae, resolve_device,
)
from rapm_core.trajectories.chain import initial_noise
from storage.atomic import write_bytes_atomic, write_json_atomic
from storage.errors import StoreError
from storage.prompt_store import PromptStore
from storage.run_dir import RunDir
from storage.teacher_fingerprint import check_teacher_unchanged
from storage.trajectory_store import TrajectoryStore

PREVIEW_DIR = "previews"
CACHE = "conditioning.safetensors"
LATEST = "latest.png"
PROMPTS = "prompts.json"
# Small teachers make small images; the grid is drawn at least this tall a row to be seen in the UI.
MIN_ROW_PIXELS = 128


def preview_name(step: int) -> str:
    return f"step-{step:07d}.png"


def _eval_prompts(store: TrajectoryStore, count: int) -> list[str]:
    source = store.schema.prompt_store.path if store.schema.prompt_store else None
    if source is None:
        return []
    try:
        return [r.text for r in PromptStore(source).records("eval")][:count]
    except (StoreError, OSError):  # the prompt store moved or is gone: a run trains without it
        return []


def _decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """(P, H, W, 3) uint8, one image at a time: a batched decode at SDXL size would need more
    memory than the training run beside it was planned with."""
    return torch.cat([to_uint8(decode_latents(vae, z[None])) for z in latents]).permute(0, 2, 3, 1).contiguous()


def _noise(count: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return initial_noise([eval_seed(0, i) for i in range(count)], shape, dtype, device)


@torch.no_grad()
def _encode_and_reference(store: TrajectoryStore, prompts: list[str], device: torch.device,
                          path: Path) -> tuple[Conditioning, torch.Tensor]:
    """Encode ``prompts`` and sample the teacher's N·M-step reference with the whole teacher, once;
    saved to ``path`` so no later start needs the text encoders."""
    schema = store.schema
    check_teacher_unchanged(schema, store.path)
    teacher = load_store_teacher(schema, device)
    cond = encode_prompts(teacher, prompts)
    nm = schema.num_slots * schema.steps_per_slot
    spec = SamplerSpec("teacher_ref", nm, schema.guidance, f"teacher {nm} steps")
    noise = _noise(len(prompts), teacher.latent_shape, teacher.dtype, device)
    z = sample_latents(spec, teacher.unet, teacher.scheduler_config, noise, cond, encode_uncond(teacher))
    reference = _decode(teacher.pipe.vae, z)
    tensors = {f"cond.{k}": v.detach().float().cpu().contiguous() for k, v in
               (("prompt_embeds", cond.prompt_embeds), ("pooled_prompt_embeds", cond.pooled_prompt_embeds),
                ("time_ids", cond.time_ids)) if v is not None}
    tensors["reference"] = reference
    write_bytes_atomic(path, save(tensors, metadata={"prompts": json.dumps(prompts)}))
    del teacher
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cond.to("cpu", torch.float32), reference


def _load_cache(path: Path, prompts: list[str] | None) -> tuple[list[str], Conditioning, torch.Tensor] | None:
    """The cached conditioning and reference, if there is a readable one for these prompts
    (``None``: whatever it holds, for a run whose prompt store is gone)."""
    if not path.is_file():
        return None
    try:
        # Read whole, not memory-mapped: a file changed under a mapping would crash the run (SIGBUS).
        data = path.read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the safetensors format
        cached = json.loads(header["__metadata__"]["prompts"])
        tensors = load(data)
    except Exception:  # a damaged cache is derived data: made again
        return None
    if prompts is not None and cached != prompts:
        return None
    cond = Conditioning(tensors["cond.prompt_embeds"], tensors.get("cond.pooled_prompt_embeds"),
                        tensors.get("cond.time_ids"))
    return cached, cond, tensors["reference"]


@dataclass
class Previews:
    prompts: list[str]
    cond: Conditioning  # (P, …) fp32 on the CPU
    reference: torch.Tensor  # (P, H, W, 3) uint8: the teacher's N·M-step samples
    vae: torch.nn.Module  # in host memory but while decoding
    dir: Path

    @torch.no_grad()
    def write(self, trainer: Trainer, step: int) -> Path:
        """``previews/step-XXXXXXX.png`` and ``latest.png``: a row per prompt, the teacher's reference
        then the student at ``step``."""
        student, method = trainer.student, trainer.method
        sampler = method.stock_sampler()  # exactly what the export will ship
        spec = SamplerSpec("student", sampler.num_steps, 1.0, f"student {sampler.num_steps} steps", sampler)
        n = len(self.prompts)
        devices = [student.device] if student.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            noise = _noise(n, latent_shape(student.unet.config), student.dtype, student.device)
            with student.autocast():  # the training forward's precision
                z = sample_latents(spec, student.unet, student.scheduler_config, noise, self.cond.to(student.device), None,
                                   [eval_seed(0, i, "rapm-eval-steps") for i in range(n)])
            # The VAE waits in host memory between previews: on the accelerator it would sit beside
            # every training iteration, which was planned (`rapm plan`) without it.
            images = _decode(self.vae.to(student.device), z.float())
            self.vae.to("cpu")
        grid = torch.stack([self.reference, images], dim=1).numpy()
        scale = max(1, MIN_ROW_PIXELS // grid.shape[2])
        sheet = png_bytes(contact_sheet(grid.repeat(scale, axis=2).repeat(scale, axis=3)))
        out = self.dir / preview_name(step)
        write_bytes_atomic(out, sheet)
        write_bytes_atomic(self.dir / LATEST, sheet)
        return out


def open_previews(count: int, store: TrajectoryStore, run: RunDir, device_name: str,
                  log: Callable[[str], None]) -> Previews | None:
    """The run's previews (encoding the prompts and sampling the reference on a first start), or
    None when they are off or there is no eval split to draw prompts from."""
    if count == 0:
        return None
    directory = run.path / PREVIEW_DIR
    for stale in directory.glob(".*.tmp"):  # a killed run's unfinished write (the run dir is locked: none is live)
        stale.unlink(missing_ok=True)
    device = resolve_device(device_name)
    prompts = _eval_prompts(store, count)
    cached = _load_cache(directory / CACHE, prompts or None)
    if cached is None and not prompts:
        log("previews: no eval split in the prompt store; none will be drawn")
        return None
    t0 = time.perf_counter()
    if cached is None:
        cond, reference = _encode_and_reference(store, prompts, device, directory / CACHE)
        log(f"previews: {len(prompts)} eval prompts encoded and the teacher's reference sampled "
            f"({time.perf_counter() - t0:.1f} s); at every checkpoint in {directory}")
    else:
        prompts, cond, reference = cached
    write_json_atomic(directory / PROMPTS, prompts)  # the grid's rows, for whoever shows it
    vae = load_vae(store.schema.teacher, store.schema.teacher_revision, torch.float32, "cpu")
    return Previews(prompts, cond, reference, vae, directory)
