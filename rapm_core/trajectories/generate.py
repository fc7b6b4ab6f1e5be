"""Stage A's engine: prompt store + teacher → trajectory store.

``generate_trajectories`` fills an index range [start, stop) of the store; the flow calls it
once in-process or once per shard on Dask. Shards whose ranges start on multiples of
``batch_size`` batch exactly like one uninterrupted run, so their results are bit-identical; the
store must exist before shards run concurrently: ``generate_trajectories(config, stop=0)``
creates it empty. ``batch_size``, ``device`` and ``execution`` are not part of the store's
identity: they change speed, not what is computed (up to kernel-level float differences between
devices).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from importlib.metadata import version
from typing import Any, Callable

import torch

from rapm_core.errors import ConfigError
from rapm_core.progress import Progress
from rapm_core.ode import SlotGrid
from rapm_core.teacher import (
    Teacher, check_dtype_on_device, count_truncated, detect_kind, encode_prompts, encode_uncond, load_teacher,
    resolve_device, resolve_dtype, teacher_identifier,
)
from rapm_core.trajectories.chain import initial_noise, teacher_trajectories, trajectory_seed
from rapm_core.trajectories.config import TrajectoriesConfig
from storage.errors import StoreError
from storage.hashing import config_hash
from storage.locks import DirLock
from storage.prompt_store import PromptRecord, PromptStore
from storage.teacher_fingerprint import check_teacher_unchanged, teacher_fingerprint
from storage.trajectory_schema import PromptSource, StoreSchema
from storage.trajectory_store import TrajectoryStore, check_compatible
from storage.urls import is_url

CREATED_BY = f"rapm {version('rapm')}"


@dataclass(frozen=True)
class Opened:
    """What a command learns before any weights load, found once and passed on: every trajectory's
    prompt, and the store already at ``config.out`` (checked against the config; None if absent)."""

    records: list[PromptRecord]
    store: TrajectoryStore | None


@dataclass(frozen=True)
class GenerationReport:
    store: str
    generated: int
    already_complete: int
    index_range: tuple[int, int]
    seconds: float
    write_seconds: float  # background writer's busy time (overlapped with generation)
    wait_seconds: float  # generation blocked on a full write queue
    truncated_prompts: int


def select_prompts(config: TrajectoriesConfig) -> list[PromptRecord]:
    """The prompt of every trajectory, in store order: the split (first ``limit``), repeated
    ``samples_per_prompt`` times, round after round, so trajectory i of a one-sample store is
    trajectory i of a larger one (same prompt, same seed)."""
    records = PromptStore(config.prompts).records(config.split)
    records = records[: config.limit] if config.limit else records
    if not records:
        raise StoreError(f"{config.prompts}: no prompts in split {config.split!r}")
    return records * config.samples_per_prompt


def wanted_identity(config: TrajectoriesConfig, records: list[PromptRecord]) -> dict[str, Any]:
    """The identity fields known before the teacher loads (its kind and shapes come later)."""
    return {
        "teacher": teacher_identifier(config.teacher), "teacher_revision": config.revision, "num_slots": config.slots,
        "steps_per_slot": config.steps_per_slot, "guidance": config.guidance, "seed": config.seed,
        "compute_dtype": config.dtype, "store_dtype": config.store_dtype,
        "prompts_hash": config_hash({"prompt_ids": [r.id for r in records]}), "num": len(records),
        "max_sequence_length": config.max_sequence_length,  # compared only with stores that record one (SD3)
    }


def open_existing(config: TrajectoriesConfig) -> Opened:
    """The prompts and the store at ``config.out``, opened once; a store of another identity is refused."""
    records = select_prompts(config)
    return Opened(records, check_compatible(config.out, wanted_identity(config, records)))


def preflight(config: TrajectoriesConfig) -> Opened:
    """The cheap checks (prompt store, existing store, teacher config) before any weights load."""
    opened = open_existing(config)
    detect_kind(teacher_identifier(config.teacher), config.revision)
    check_dtype_on_device(config.dtype, resolve_device(config.device))
    return opened


def store_schema(config: TrajectoriesConfig, records: list[PromptRecord], teacher: Teacher,
                 grid: SlotGrid) -> StoreSchema:
    prompt_meta = PromptStore(config.prompts).meta
    identity = wanted_identity(config, records)
    if teacher.kind != "sd3":  # only SD3's prompt encoding depends on it
        identity["max_sequence_length"] = None
    return StoreSchema(
        **identity, kind=teacher.kind, scheduler_config=teacher.scheduler_config,
        latent_shape=teacher.latent_shape, embed_dtype="float16" if config.dtype == "fp16" else "float32",
        teacher_fingerprint=teacher_fingerprint(teacher_identifier(config.teacher)),
        fine_timesteps=list(grid.fine), coarse_timesteps=list(grid.coarse),
        prompt_store=PromptSource(path=config.prompts, split=config.split, limit=config.limit,
                                  samples_per_prompt=config.samples_per_prompt,
                                  config_hash=prompt_meta.get("config_hash")),
        created_by=CREATED_BY, config=config.model_dump(mode="json"),
    )


def sampling_teacher(teacher: Teacher, device: torch.device | str) -> Teacher:
    """``teacher`` with what Stage A runs (denoiser, text encoders) on ``device`` and its VAE in host
    memory: the stage never decodes, so on the accelerator the VAE would only take memory. A
    preloaded teacher's VAE is moved off as well."""
    pipe = teacher.pipe
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.to("cpu")
    return teacher


def generate_trajectories(
    config: TrajectoriesConfig,
    start: int = 0,
    stop: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    teacher: Teacher | Callable[[], Teacher] | None = None,
    log: Callable[[str], None] = print,
    lock: bool = True,
    opened: Opened | None = None,
) -> GenerationReport:
    """Create or resume the store at ``config.out`` and fill trajectories [start, stop).

    Only batches with an incomplete trajectory are generated; when none is missing the teacher
    is not even loaded. Pass ``teacher`` to reuse one already loaded (e.g. across shards), or a
    function returning it, called only if something is missing. A local store is locked for the
    call (one writer per store); a shard passes ``lock=False``, its coordinator holding the lock
    for all of its shards, which write disjoint chunks. ``opened``: what :func:`preflight` found,
    if the caller has it (the store is then not opened again).
    """
    with store_lock(config.out) if lock else nullcontext():
        return _generate(config, opened or open_existing(config), start, stop, progress, teacher, log)


def store_lock(path: str):
    """The one-writer lock of a local trajectory store (a sibling file: Zarr warns about foreign
    files inside a group); none for fsspec URLs, which have no flock."""
    return nullcontext() if is_url(path) else DirLock.beside(path, what="trajectory store")


def _generate(config: TrajectoriesConfig, opened: Opened, start: int, stop: int | None,
              progress: Callable[[Progress], None] | None, teacher: Teacher | Callable[[], Teacher] | None,
              log: Callable[[str], None]) -> GenerationReport:
    t0 = time.perf_counter()
    records, existing = opened.records, opened.store
    stop = len(records) if stop is None else stop
    if not 0 <= start <= stop <= len(records):
        raise ConfigError(f"index range [{start}, {stop}) is outside the {len(records)} trajectories of this config")
    if existing is not None and not existing.pending_batches(start, stop, config.batch_size):
        log(f"{config.out}: trajectories [{start}, {stop}) already complete; nothing to do")
        return GenerationReport(config.out, 0, stop - start, (start, stop), time.perf_counter() - t0, 0.0, 0.0, 0)
    if existing is not None:
        check_teacher_unchanged(existing.schema, config.out)

    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    preloaded = teacher() if callable(teacher) else teacher
    teacher = sampling_teacher(preloaded or load_teacher(config.teacher, config.revision, dtype, "cpu"),
                               preloaded.device if preloaded else device)
    teacher = replace(teacher, max_sequence_length=config.max_sequence_length)
    if teacher.dtype != dtype:
        raise ConfigError(f"the preloaded teacher computes in {teacher.dtype}, the config asks for {config.dtype}")
    try:
        grid = SlotGrid.from_scheduler(teacher.scheduler_config, config.slots, config.steps_per_slot)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    texts = [r.text for r in records]
    truncated = count_truncated(teacher, texts[start:stop]) if stop > start else 0
    if truncated:
        log(f"{truncated} of {stop - start} prompts exceed the tokenizer limit and were truncated, as stock diffusers does")

    uncond = encode_uncond(teacher)
    schema = store_schema(config, records, teacher, grid)
    store = TrajectoryStore.open_or_create(
        config.out, schema, texts, [r.id for r in records],
        [trajectory_seed(config.seed, i) for i in range(len(records))], uncond.to_arrays(schema.embed_dtype),
        existing=existing,
    )
    seeds = store.seeds()
    batches = store.pending_batches(start, stop, config.batch_size)
    total = sum(b - a for a, b in batches)
    done, t_gen = 0, time.perf_counter()
    with store.writer() as writer:
        for a, b in batches:
            cond = encode_prompts(teacher, texts[a:b])
            noise = initial_noise(seeds[a:b], teacher.latent_shape, dtype, teacher.device)
            z = teacher_trajectories(teacher.unet, teacher.scheduler_config, grid, noise, cond, uncond, config.guidance)
            writer.submit(a, {"positions": z.detach().float().cpu().numpy().astype(schema.store_dtype),
                              **cond.to_arrays(schema.embed_dtype)})
            done += b - a
            if progress is not None:
                progress(Progress(done, total, done / max(time.perf_counter() - t_gen, 1e-9), "trajectories"))
    return GenerationReport(config.out, total, (stop - start) - total, (start, stop), time.perf_counter() - t0,
                            writer.write_seconds, writer.wait_seconds, truncated)
