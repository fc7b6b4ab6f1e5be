"""Peak accelerator memory of each pipeline stage, measured by running the stage on meta tensors.

Each function builds the modules the stage really puts on the device (real diffusers and
transformers classes, on meta, in the target dtype: a UNet, or an SD3-class teacher's
transformer with T5 beside the CLIPs) and runs the stage's own code on them —
``teacher_trajectories``, the distillation ``Trainer`` (RAPM, PCM or LCM-LoRA as the registry
builds them), ``ode_sample``, ``decode_latents`` and the figure's ``decode_in_batches`` — under
a ``MemoryCounter``. Work that repeats with the same shapes is run once: a trajectory's N·M
teacher calls are one real call after N·M−1 stand-ins that return an output of the right shape
(the positions still pile up as in the real loop), a RAPM iteration is one slot (every slot has
the same shapes, and each slot's graph is freed by its own backward; with all slots it starts
from the gradients earlier slots leave), and the evaluate stage samples one step of one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import reduce
from typing import Iterable, Iterator

import torch

from diffusers.models.modeling_outputs import Transformer2DModelOutput

from rapm_core.conditioning import Conditioning
from rapm_core.errors import ConfigError
from planner.architecture import Architecture
from planner.config import FIGURE_ROWS, PlanConfig
from planner.engine import (
    LCM_ON_FLOW, Example, GuidedTeacher, Trainer, decode_in_batches, lora_targets, teacher_trajectories,
)
from planner.meta_memory import MemoryCounter, efficient_attention, module_tensors, optimizer_tensors
from rapm_core.sampler import ode_sample
from rapm_core.ode import SlotGrid
from rapm_core.teacher import DTYPES, decode_latents

META = torch.device("meta")


@dataclass
class StageEstimate:
    name: str
    peak_bytes: int
    weights_bytes: int  # frozen modules resident on the device for the whole stage
    resident: dict[str, int]  # everything on the device before the stage's work starts, by part
    phases: dict[str, int]  # peak live bytes during each phase of the work
    flops: dict[str, float]  # per phase, as counted (see the stage for what one phase covers)
    notes: list[str] = field(default_factory=list)
    trainable_parameters: int = 0  # distill: LoRA and discriminator heads

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_phase": self.peak_phase}


class _Recorder:
    """One MemoryCounter across a stage: resident parts first, then phases of work."""

    def __init__(self, attention: str):
        self.counter = MemoryCounter("meta")
        self.efficient = attention == "efficient"
        self.resident: dict[str, int] = {}
        self.phases: dict[str, int] = {}
        self.flops: dict[str, float] = {}

    def add_resident(self, name: str, tensors: Iterable[torch.Tensor]) -> None:
        self.resident[name] = self.resident.get(name, 0) + self.counter.track(tensors)

    def add_resident_bytes(self, name: str, nbytes: int) -> None:
        """Memory that is there for the whole stage but not built (counted, never freed)."""
        self.resident[name] = self.resident.get(name, 0) + nbytes
        self.counter.live += nbytes
        self.counter.peak = max(self.counter.peak, self.counter.live)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        c = self.counter
        c.reset_peak()
        flops0 = c.flops
        with efficient_attention(self.efficient), c:
            yield
        self.phases[name] = c.peak
        self.flops[name] = float(c.flops - flops0)

    def estimate(self, name: str, weights: Iterable[str], notes: list[str]) -> StageEstimate:
        return StageEstimate(name, max(self.phases.values()), sum(self.resident[w] for w in weights),
                             dict(self.resident), dict(self.phases), dict(self.flops), notes)


# -- shared pieces ---------------------------------------------------------------------------------
def _dtype(config: PlanConfig) -> torch.dtype:
    return DTYPES[config.precision]


def embed_dtype(config: PlanConfig) -> torch.dtype:
    # What the trajectory store keeps the embeddings in (generate_trajectories: float16 iff fp16).
    return torch.float16 if config.precision == "fp16" else torch.float32


def _grid(arch: Architecture, slots: int, steps_per_slot: int) -> SlotGrid:
    try:
        return SlotGrid.from_scheduler(arch.scheduler_config(), slots, steps_per_slot)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def encode(arch: Architecture, encoders: list[torch.nn.Module], batch: int, dtype: torch.dtype,
           device: torch.device = META) -> Conditioning:
    """The text encoders' forward as ``rapm_core.teacher.encode_prompts`` runs it (via the stock
    ``encode_prompt``): SD 1.5 takes the last hidden state; SDXL the penultimate hidden state of
    both encoders, concatenated, and the second one's projected pooled output; SD3 the same two
    CLIP states padded to T5's width, T5's last state (zeros without T5) after them along the
    sequence, and both CLIPs' projected pooled outputs side by side."""
    ids = torch.zeros(batch, arch.clip_length, dtype=torch.long, device=device)
    if arch.kind == "sd15":
        return Conditioning(encoders[0](ids)[0])
    hidden, pooled = [], []
    for encoder in encoders[:len(arch.clip_encoders)]:
        out = encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    if arch.kind == "sdxl":
        time_ids = torch.zeros(batch, 6, dtype=dtype, device=device)
        return Conditioning(torch.cat(hidden, dim=-1), pooled[-1], time_ids)
    t5_ids = torch.zeros(batch, arch.max_sequence_length, dtype=torch.long, device=device)
    t5 = (encoders[-1](t5_ids)[0] if arch.has_t5
          else torch.zeros(batch, arch.max_sequence_length, arch.embed_dim, dtype=dtype, device=device))
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))


def _shaped_like(cond: Conditioning, batch: int) -> Conditioning:
    def empty(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_empty((batch, *t.shape[1:]))

    return Conditioning(empty(cond.prompt_embeds), empty(cond.pooled_prompt_embeds), empty(cond.time_ids))


def lora_parameter_count(model: torch.nn.Module, rank: int) -> int:
    """Parameters of a rank-``rank`` adapter on ``model``'s family's LoRA targets, matched as peft
    matches them (a module whose name is, or ends with ".", a target key): r·(in + out) per
    Linear, r·in·k² + out·r per Conv2d."""
    total, targets = 0, lora_targets(model)
    for name, module in model.named_modules():
        if not any(name == key or name.endswith("." + key) for key in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += rank * module.in_channels * k + module.out_channels * rank
    return total


def host_placeholder(*shape: int) -> torch.Tensor:
    """A host tensor of ``shape`` that holds one element (every index reads it): what the planner
    gives the stages for data they read from a store, so a plan allocates nothing at the model's
    sizes (copying one to the accelerator, here meta, makes a full-size tensor that is counted)."""
    return torch.zeros(()).expand(shape)


def stored_conditioning(arch: Architecture, dtype: torch.dtype, make=host_placeholder) -> Conditioning:
    """One trajectory's conditioning as the store gives it to distillation (host memory);
    ``make(*shape)`` fills it (a placeholder for a plan, random values for a real run)."""
    pooled = None if arch.pooled_dim is None else make(1, arch.pooled_dim).to(dtype)
    time_ids = make(1, 6).to(dtype) if arch.has_time_ids else None
    return Conditioning(make(1, arch.text_length, arch.embed_dim).to(dtype), pooled, time_ids)


def training_inputs(arch: Architecture, config: PlanConfig,
                    make=host_placeholder) -> tuple[Example, GuidedTeacher | None]:
    """One distillation example as ``rapm_core.distill.data.load_example`` gives it (host, fp32
    positions; x0 the trajectory's end, the peers' default ``x0_source``) and, for the peers, the
    store's guided teacher (its unconditional row and the trajectories' guidance)."""
    c, h, w = arch.latent_shape(config.resolution)
    positions = make(config.slots * config.steps_per_slot + 1, c, h, w)
    example = Example(positions, stored_conditioning(arch, embed_dtype(config), make), 0, positions[-1:])
    if config.method.method == "rapm":
        return example, None
    return example, GuidedTeacher(stored_conditioning(arch, embed_dtype(config), make), config.guidance)


@contextmanager
def last_call_only(model: torch.nn.Module, calls: int) -> Iterator[None]:
    """In a sampling loop of ``calls`` calls, every call of ``model`` but the last returns an
    output of the right shape without computing it. A loop's memory is its positions plus one
    call's working set, which is the same for every call, so the last call (all positions held)
    is the peak; the stand-ins keep every other op of the loop real. The module's own ``forward``
    is swapped, so the loop calls it through ``rapm_core.denoiser`` as it calls the real one."""
    real, made = model.forward, 0
    out_channels = int(model.config.out_channels)

    def forward(*args, **kwargs):
        nonlocal made
        made += 1
        if made == calls:
            return real(*args, **kwargs)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        out = torch.empty(sample.shape[0], out_channels, *sample.shape[2:], dtype=sample.dtype, device=sample.device)
        # Both families' output classes read as ``.sample`` and as ``[0]``.
        return Transformer2DModelOutput(sample=out)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def refuse_on_transformer(arch: Architecture, method) -> None:
    """What ``rapm distill`` refuses on an SD3-class teacher (``check_method_fits``), in its words."""
    if not arch.is_transformer:
        return
    if method.method == "lcm":
        raise ConfigError(LCM_ON_FLOW)


def _prime_optimizers(*optimizers: torch.optim.Optimizer | None) -> None:
    """Make the optimizers step as they do on CUDA (foreach: one kernel over all parameters, whose
    temporaries span every parameter at once) and give them the AdamW states a run carries from
    its second iteration on, as ``Adam._init_group`` creates them (a real zero-gradient step
    would cost seconds of meta ops and create the same tensors)."""
    for opt in optimizers:
        if opt is None:
            continue
        for group in opt.param_groups:
            group["foreach"] = True
            for p in group["params"]:
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}


# The iteration planned: odd, so with the alternating schedule it is a LoRA step (the backward
# through the UNet), the larger of the two.
ITERATION = 1


def _iteration(trainer: Trainer, example: Example, generator: torch.Generator, accumulating: bool) -> None:
    """``Trainer.train_step`` as its peak pass runs it. With all N ≥ 2 RAPM slots per iteration,
    slots after the first add their gradients to those already held (the old and the incoming
    gradient are alive together), so the one slot planned here starts from gradients in place;
    otherwise it is the plain step."""
    if not accumulating:
        trainer.train_step(example, generator, ITERATION)
        return
    g_steps, d_steps = trainer.stepping(ITERATION)
    trainables = [*(trainer.lora_params if g_steps else []), *(trainer.heads.parameters() if d_steps else [])]
    for p in trainables:
        p.grad = torch.zeros_like(p)
    trainer.accumulate_gradients(example, generator, ITERATION)
    trainer._step(example.index, ITERATION)


# -- stages ----------------------------------------------------------------------------------------
def trajectories(arch: Architecture, config: PlanConfig) -> StageEstimate:
    """Stage A at batch B: text encoders (T5 too, when the teacher has it) and the denoiser on the
    device (``sampling_teacher`` keeps the VAE in host memory), prompts encoded, then N·M guided
    steps of the teacher's ODE (DDIM, or a flow teacher's Euler) keeping every position, and the
    device-side float copy ``generate_trajectories`` makes before writing."""
    dtype = _dtype(config)
    c, h, w = arch.latent_shape(config.resolution)
    batch, grid = config.trajectory_batch, _grid(arch, config.slots, config.steps_per_slot)
    net, encoders = arch.build_denoiser(dtype), arch.build_text_encoders(dtype)
    denoiser = arch.denoiser_folder
    rec = _Recorder(config.attention)
    rec.add_resident(denoiser, module_tensors(net))
    rec.add_resident("text_encoders", module_tensors(*encoders))
    guided = config.guidance > 1.0
    with torch.no_grad():
        with rec.phase("encode prompts"):
            uncond = encode(arch, encoders, 1, dtype) if guided else None
            cond = encode(arch, encoders, batch, dtype)
        with rec.phase("sample N·M steps"):
            noise = torch.empty(batch, c, h, w, dtype=dtype, device=META)
            with last_call_only(net, grid.total_steps):
                z = teacher_trajectories(net, arch.scheduler_config(), grid, noise, cond, uncond, config.guidance)
            host_copy = z.detach().float()
            del host_copy, z
    est = rec.estimate("trajectories", (denoiser, "text_encoders"), [])
    unet_batch = batch * (2 if guided else 1)
    est.flops["unet_forward_batch1"] = est.flops["sample N·M steps"] / unet_batch
    est.flops["per_trajectory"] = est.flops["sample N·M steps"] * grid.total_steps / batch
    return est


def distill(arch: Architecture, config: PlanConfig) -> StageEstimate:
    """Stage B's steady-state iteration: the frozen denoiser, LoRA (fp32) and its AdamW states,
    heads and theirs when adversarial, and the real ``Trainer`` step of the method: RAPM's on a
    one-slot grid of the same N·M positions, a peer's whole iteration (its guided teacher step
    included). On an SD3-class teacher, what ``rapm distill`` refuses is refused here too."""
    method = config.distill_method()
    refuse_on_transformer(arch, method)
    training = method.training
    weights = DTYPES[training.weights_dtype]
    compute = weights if training.mixed_precision == "no" else DTYPES[training.mixed_precision]
    steps = config.slots * config.steps_per_slot
    grid = _grid(arch, config.slots, config.steps_per_slot)
    scheduler = arch.scheduler_config()
    if method.method == "rapm":
        grid = SlotGrid.from_scheduler(scheduler, 1, steps)
    # Meta tensors have no autocast (and the Student refuses it off CUDA): mixed precision is
    # planned as a UNet in the compute dtype, its fp32 master weights added below.
    on_meta = method.model_copy(update={"training": training.model_copy(update={"mixed_precision": "no"})})
    example, teacher = training_inputs(arch, config)
    trainer = Trainer(arch.build_denoiser(compute), scheduler, grid, on_meta, device=META, teacher=teacher)
    optimizers = (trainer.g_optimizer, trainer.d_optimizer)
    _prime_optimizers(*optimizers)
    lora_ids = {id(p) for p in trainer.lora_params}
    frozen = [t for t in module_tensors(trainer.unet) if id(t) not in lora_ids]
    rec = _Recorder(config.attention)
    notes = []
    denoiser = arch.denoiser_folder
    if compute == weights:
        rec.add_resident(denoiser, frozen)
    else:
        # Autocast casts each frozen weight per op and the student's backward keeps the casts:
        # at the peak a compute-dtype copy of the UNet sits beside the master weights.
        rec.add_resident("autocast_copies", frozen)
        rec.add_resident_bytes(denoiser, sum(t.numel() for t in frozen) * weights.itemsize)
        notes.append(f"--mixed-precision {training.mixed_precision}: planned as {training.mixed_precision} compute "
                     f"with {training.weights_dtype} master weights and a {training.mixed_precision} copy of them")
    rec.add_resident("lora", trainer.lora_params)
    if len(trainer.heads):
        rec.add_resident("heads", module_tensors(trainer.heads))
    rec.add_resident("optimizer_state", optimizer_tensors(*optimizers))
    rec.add_resident("schedule", trainer.student.ode.tensors())
    uncond = getattr(trainer.method, "uncond", None)
    if uncond is not None:
        rec.add_resident("uncond", uncond.tensors())
    generator = torch.Generator().manual_seed(0)
    accumulating = method.method == "rapm" and config.slots > 1 and method.rapm.slots_per_iteration == "all"
    with rec.phase("iteration"):
        _iteration(trainer, example, generator, accumulating)
    if method.method != "rapm":
        notes.append(f"{method.method}: one iteration of rapm_core.distill.{method.method} through the Trainer")
    est = rec.estimate("distill", (denoiser,), notes)
    est.trainable_parameters = sum(p.numel() for p in trainer.lora_params) + sum(
        p.numel() for p in trainer.heads.parameters())
    return est


def evaluate(arch: Architecture, config: PlanConfig) -> StageEstimate:
    """Stage C: the whole pipeline plus the student's LoRA on the device, every eval prompt's
    conditioning and noise, one sampling step of one batch (the fused student samples like the
    bare UNet), its decode, and the trajectory figure's decode (``decode_in_batches``)."""
    dtype = _dtype(config)
    c, h, w = arch.latent_shape(config.resolution)
    batch, images = config.eval_batch, config.eval_images
    net, vae, encoders = arch.build_denoiser(dtype), arch.build_vae(dtype), arch.build_text_encoders(dtype)
    denoiser = arch.denoiser_folder
    rec = _Recorder(config.attention)
    rec.add_resident(denoiser, module_tensors(net))
    # The student's adapter as load_lora_weights leaves it (in the UNet's dtype): counted, not
    # attached, since the fused student samples like the bare UNet and peft's attach costs seconds.
    rec.add_resident_bytes("lora", lora_parameter_count(net, config.method.training.rank) * net.dtype.itemsize)
    rec.add_resident("text_encoders", module_tensors(*encoders))
    rec.add_resident("vae", module_tensors(vae))
    guided = config.guidance > 1.0
    scheduler = arch.scheduler_config()
    with torch.no_grad():
        with rec.phase("encode prompts"):
            # evaluate_run encodes batch by batch and concatenates; one batch is encoded for
            # real (the encoder's working set), the others are made in its shapes.
            first = encode(arch, encoders, batch, dtype)
            parts = [first] + [_shaped_like(first, min(batch, images - a)) for a in range(batch, images, batch)]
            cond = reduce(Conditioning.cat, parts)
            del first, parts
            uncond = encode(arch, encoders, 1, dtype) if guided else None
            noise = torch.empty(images, c, h, w, dtype=dtype, device=META)
        with rec.phase("sample one step"):
            z = ode_sample(net, scheduler, noise[:batch], cond[:batch], 1, config.guidance, uncond)
        with rec.phase("decode"):
            decode_latents(vae, z)
            del z
        with rec.phase("trajectory figure decode"):
            figure = torch.empty(FIGURE_ROWS * (config.slots + 1), c, h, w, dtype=dtype, device=META)
            decode_in_batches(lambda latents: decode_latents(vae, latents), figure)
            del figure
    notes = ["Inception, CLIP and the shapes evaluator (when used) are not counted"]
    if arch.vae.get("force_upcast") and config.precision == "fp16":
        notes.append("this VAE overflows in fp16 (its config sets force_upcast); decode_latents does not upcast")
    est = rec.estimate("evaluate", (denoiser, "lora", "text_encoders", "vae"), notes)
    est.flops["per_image_step"] = est.flops["sample one step"] / batch
    return est


STAGES = {"trajectories": trajectories, "distill": distill, "evaluate": evaluate}
