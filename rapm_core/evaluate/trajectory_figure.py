"""trajectory.png: stored teacher positions at the slot boundaries vs the student's own N-step
chain from the same stored noise and embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.errors import ConfigError
from rapm_core.evaluate import report
from rapm_core.evaluate.samplers import SamplerSpec, sample_latents
from rapm_core.evaluate.student import StudentExport
from rapm_core.ode import SlotGrid
from storage.trajectory_store import TrajectoryStore

# Latents per VAE decode of the figure. The figure shows rows × (N+1) latents twice (teacher and
# student); decoded at once they were the evaluation's largest allocation, whatever --batch-size
# was (rapm plan's evaluate stage measures it). One at a time keeps the figure below the sampling
# batch's own decode at any --batch-size, for 2·rows·(N+1) VAE calls: a small share of an
# evaluation that decodes every sampled image.
FIGURE_DECODE_BATCH = 1


def decode_in_batches(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                      batch: int = FIGURE_DECODE_BATCH) -> torch.Tensor:
    """``decode`` over (B, C, H, W) latents ``batch`` at a time, concatenated (host images)."""
    return torch.cat([decode(latents[a:a + batch]) for a in range(0, latents.shape[0], batch)])


def trajectory_figure(store: TrajectoryStore, teacher, student: StudentExport,
                      decode: Callable[[torch.Tensor], torch.Tensor], rows: int, out: Path) -> None:
    """Needs ``teacher.unet`` to carry the student's LoRA already (the evaluation loads it)."""
    schema = store.schema
    grid = SlotGrid.from_scheduler(schema.scheduler_config, schema.num_slots, schema.steps_per_slot)
    recs = [store.read(int(i)) for i in store.complete_indices()[:rows]]
    device, dtype = teacher.device, teacher.dtype
    positions = torch.stack([torch.from_numpy(r.positions.astype("float32")) for r in recs]).to(device, dtype)
    cond = Conditioning.from_arrays([r.conditioning for r in recs], dtype=dtype, device=device)
    teacher_pos = positions[:, grid.boundary_indices()]
    spec = SamplerSpec("student", student.num_steps, 1.0, "student", student.sampler)
    student_pos = sample_latents(spec, teacher.unet, schema.scheduler_config, positions[:, 0], cond, None,
                                 [r.seed for r in recs], return_positions=True)
    k = teacher_pos.shape[1]
    if student_pos.shape[1] != k:
        raise ConfigError(f"the student samples {student.num_steps} steps but the store has {k - 1} slots")

    def decoded(pos: torch.Tensor) -> torch.Tensor:
        flat = decode_in_batches(decode, pos.flatten(0, 1))
        return flat.reshape(pos.shape[0], k, *flat.shape[1:])

    report.plot_trajectories(decoded(teacher_pos), decoded(student_pos), [r.prompt for r in recs],
                             grid.boundary_times(), out)
