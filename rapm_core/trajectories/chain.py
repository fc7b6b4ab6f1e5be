"""Stage A: the teacher's guided N·M-step DDIM trajectories, every position kept.

Each trajectory's initial noise comes from its own seed, ``trajectory_seed(global_seed, index)``,
where ``index`` is the trajectory's slot in the store. Noise is drawn exactly as diffusers'
``randn_tensor`` draws it for a CPU ``torch.Generator``, so trajectory i is also reproducible
with a stock pipeline (``generator=torch.Generator().manual_seed(seed_i)``), and any subset of
trajectories (a resume, a shard) gets the same noise as a single uninterrupted run.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from diffusers.utils.torch_utils import randn_tensor

from rapm_core.conditioning import Conditioning
from rapm_core.sampler import ddim_sample
from rapm_core.schedule import SlotGrid, alpha_bar


def trajectory_seed(global_seed: int, index: int) -> int:
    """A 63-bit seed per trajectory: sha256 of ``rapm-trajectory:{global_seed}:{index}``."""
    digest = hashlib.sha256(f"rapm-trajectory:{int(global_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_noise(seeds: list[int], shape: tuple[int, int, int], dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """(B, C, H, W) noise, one CPU generator per seed, as a stock pipeline draws it from a generator list."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return randn_tensor((len(seeds), *shape), generator=generators, device=torch.device(device), dtype=dtype)


def teacher_trajectories(
    unet: torch.nn.Module,
    scheduler_config: Mapping[str, Any] | Any,
    grid: SlotGrid,
    noise: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance: float,
) -> torch.Tensor:
    """(B, N·M+1, C, H, W): Z[0] = noise, Z[k] = the guided teacher's position after k fine steps."""
    return ddim_sample(unet, scheduler_config, noise, cond, grid.total_steps, guidance, uncond,
                       return_positions=True)


def solve_x0_eps(
    z_s: torch.Tensor, z_r: torch.Tensor, t_s: int, t_r: int, alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) the teacher used for the DDIM step z_s (time t_s) → z_r (time t_r), with no UNet call.

    A deterministic DDIM step writes both positions as combinations of the same (x̂0, ε̂):
    z_s = √ᾱ_s·x̂0 + √(1−ᾱ_s)·ε̂ and z_r = √ᾱ_r·x̂0 + √(1−ᾱ_r)·ε̂; two stored positions solve it.
    """
    a_s = alpha_bar(alphas_cumprod, t_s).double()
    a_r = alpha_bar(alphas_cumprod, t_r).double()
    ss, ns, sr, nr = a_s.sqrt(), (1 - a_s).sqrt(), a_r.sqrt(), (1 - a_r).sqrt()
    det = ss * nr - ns * sr
    zs, zr = z_s.double(), z_r.double()
    x0 = (nr * zs - ns * zr) / det
    eps = (ss * zr - sr * zs) / det
    return x0.to(z_s.dtype), eps.to(z_s.dtype)


def boundary_x0(positions: torch.Tensor, grid: SlotGrid, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The teacher's x̂0 at the first N slot boundaries of one stored trajectory (K+1, C, H, W),
    solved from each boundary position and the next (the last boundary ends the sampling)."""
    ks = grid.boundary_indices()[:-1]
    return torch.stack([solve_x0_eps(positions[k], positions[k + 1], grid.fine[k], grid.fine_prev(k),
                                     alphas_cumprod)[0] for k in ks])
