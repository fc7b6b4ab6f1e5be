"""`rapm plan` never allocates host or accelerator memory at the model's sizes (it runs on meta
tensors and host placeholders), so a plan for a huge image fits in a small address space; sizes
past any use are one line."""

from __future__ import annotations

import resource

import torch

from planner.meta_memory import MemoryCounter, is_host_placeholder
from planner.stages import host_placeholder
from rapm_testing.helpers import rapm_env, run_rapm

ADDRESS_SPACE = 6 * 2**30  # bytes: torch and diffusers imported, no room for a full-size tensor


def _small_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_a_plan_at_the_largest_resolution_allocates_nothing_at_that_size(tmp_path):
    # Its decoded evaluation figure alone would be 45 GB of host memory.
    code, out, err = run_rapm(["plan", "--preset", "sd15", "--resolution", "16384"], rapm_env(tmp_path / "prefect"),
                              tmp_path / "logs", preexec_fn=_small_address_space)
    assert code == 0, err[-2000:]
    assert "16384 px" in out and "evaluate" in out


def test_an_absurd_resolution_is_one_line(rapm_in_process):
    code, _, err = rapm_in_process(["plan", "--preset", "sd15", "--resolution", "1000000"])
    assert code == 2 and err.count("\n") == 1 and "--resolution" in err and "16384" in err, err


def test_ops_on_host_placeholders_give_placeholders_while_counting():
    positions = host_placeholder(41, 4, 4096, 4096)  # 11 GB if it were real
    with MemoryCounter("meta"):
        images = torch.cat([positions[:20].permute(0, 2, 3, 1).float(), positions[20:].permute(0, 2, 3, 1)])
        on_device = positions.to("meta")
    assert images.shape == (41, 4096, 4096, 4) and is_host_placeholder(images)
    assert on_device.device.type == "meta" and on_device.shape == positions.shape
