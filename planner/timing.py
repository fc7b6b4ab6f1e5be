"""Wall time of the paper's recipe (1000 trajectories + 20K iterations): an estimate, not a measurement.

The meta runs count every op's FLOPs (forward, backward, checkpointing's recomputation,
discriminator passes), so each stage's work is known exactly in units of one teacher
denoiser (UNet or transformer) forward at batch 1. What is not known without the GPU is how
fast that forward runs: given as ``--seconds-per-call`` (``benchmarks/gpu_check.py`` measures
it), it calibrates everything; otherwise an assumed rate stands in, named in the output.
Host-side costs (data loading, checkpoints, Python between kernels) are not counted.
"""

from __future__ import annotations

from planner.config import PlanConfig

# The paper's GPU. Dense tensor-core peaks from NVIDIA's RTX A6000 datasheet (bf16/fp16 with
# fp32 accumulate; plain fp32 for fp32, as PyTorch keeps TF32 matmuls off by default) and a
# utilisation typical of UNet training kernels: an assumption, stated wherever it is used.
ASSUMED_GPU = "RTX A6000 (the paper's GPU)"
ASSUMED_TFLOPS = {"bf16": 154.8, "fp16": 154.8, "fp32": 38.7}
ASSUMED_UTILISATION = 0.4
PAPER = "paper: 31.5 h on 1×A6000 for SDXL, 1000 trajectories + 20K iterations, batch 1"


def estimate(config: PlanConfig, unet_forward_flops: float, per_trajectory_flops: float,
             per_slot_flops: float) -> dict:
    """Seconds for ``config.trajectories`` trajectories and ``config.iterations`` iterations."""
    if config.seconds_per_call is not None:
        seconds_per_call = config.seconds_per_call
        basis = "given --seconds-per-call"
    else:
        rate = ASSUMED_TFLOPS[config.precision] * 1e12 * ASSUMED_UTILISATION
        seconds_per_call = unet_forward_flops / rate
        basis = (f"assumed: {ASSUMED_GPU} at {ASSUMED_UTILISATION:.0%} of "
                 f"{ASSUMED_TFLOPS[config.precision]:g} TFLOP/s ({config.precision})")
    calls = 1.0 / unet_forward_flops  # one teacher forward at batch 1 per this many FLOPs
    n = config.slots
    if config.method.method != "rapm":
        per_iteration = per_slot_flops  # the peers' one step
    elif config.method.rapm.slots_per_iteration == "all":
        per_iteration = n * per_slot_flops
    else:
        # one trained slot after, on average, (N−1)/2 no-grad student jumps to reach it
        per_iteration = per_slot_flops + (n - 1) / 2 * unet_forward_flops
    traj_s = config.trajectories * per_trajectory_flops * calls * seconds_per_call
    distill_s = config.iterations * per_iteration * calls * seconds_per_call
    return {
        "estimate": True,
        "basis": basis,
        "seconds_per_call": seconds_per_call,
        "calls_per_trajectory": per_trajectory_flops * calls,
        "calls_per_iteration": per_iteration * calls,
        "trajectories": config.trajectories,
        "iterations": config.iterations,
        "trajectories_s": traj_s,
        "distill_s": distill_s,
        "total_s": traj_s + distill_s,
        "not_counted": "data loading, checkpoints, host overheads between kernels",
        "reference": PAPER,
    }
