"""What the stages keep on the accelerator, found by ``rapm plan`` at real size: Stage A's VAE
(never used there) stays in host memory, and the evaluation's trajectory figure decodes a few
latents at a time instead of rows·(N+1) at once."""

from __future__ import annotations

import torch

from rapm_core.distill.run import run_distillation
from rapm_core.evaluate.student import load_student_export
from rapm_core.evaluate.trajectory_figure import FIGURE_DECODE_BATCH, trajectory_figure
from rapm_core.teacher import decode_latents, load_teacher
from rapm_core.trajectories.generate import sampling_teacher
from rapm_testing.helpers import run_config
from storage.trajectory_store import TrajectoryStore


def test_stage_a_keeps_the_vae_off_the_accelerator(tiny_sdxl_dir):
    # The meta device stands in for an accelerator: what moves there is what Stage A runs.
    teacher = sampling_teacher(load_teacher(tiny_sdxl_dir), "meta")
    pipe = teacher.pipe
    assert {pipe.unet.device.type, pipe.text_encoder.device.type, pipe.text_encoder_2.device.type} == {"meta"}
    assert pipe.vae.device.type == "cpu"
    assert teacher.device.type == "meta"  # where generate_trajectories puts its noise and conditioning


def test_trajectory_figure_decodes_a_few_latents_at_a_time(tmp_path, tiny_sd15_dir, make_store):
    store_path = make_store(tmp_path, tiny_sd15_dir, num=3)
    config = run_config(store_path, tmp_path / "run", iterations=1, method={"loss_relative": "pointwise",
                                                                            "loss_absolute": "pointwise"})
    run_distillation(config, log=lambda _m: None)
    teacher = load_teacher(tiny_sd15_dir)
    student = load_student_export(tmp_path / "run" / "export")
    student.load_into(teacher.pipe)
    sizes = []

    def decode(latents: torch.Tensor) -> torch.Tensor:
        sizes.append(latents.shape[0])
        return decode_latents(teacher.pipe.vae, latents)

    store = TrajectoryStore(str(store_path))
    trajectory_figure(store, teacher, student, decode, 3, tmp_path / "trajectory.png")
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    slots = store.schema.num_slots
    assert sum(sizes) == 2 * 3 * (slots + 1) and max(sizes) <= FIGURE_DECODE_BATCH
