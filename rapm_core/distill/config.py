"""Stage B's config tree: shared training options, one section per loss family and per method.

``MethodConfig`` is everything that changes what one iteration computes (it is hashed to name a
run); ``DistillOptions`` adds how long to train and how often to save; ``DistillRunConfig`` adds
the wiring (store, run dir, seed, device) a pipeline derives from its own fields.

Defaults come from the quality benchmark (``benchmarks/RESULTS.md``): pointwise (pseudo-Huber)
ℓ_rel and ℓ_abs, because on the embedded teacher they beat the paper's adversarial losses at
equal iterations in under half the time per iteration; the two discriminators remain one option
away ("adversarial" or "both"). lr 1e-3, ten times LCM-LoRA's, because pointwise matching takes
it. Rank 1 is the paper's; no weight decay, so the rank-1 A is not pulled towards zero; grad clip
1.0 as diffusers' training scripts; heads narrower than PCM's (which use the feature width and
would be very large at SDXL size).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rapm_core.config import Device, FrozenModel, Precision

LossMode = Literal["adversarial", "pointwise", "both", "off"]
TargetKind = Literal["rel", "abs"]  # the relative or the absolute target
MethodName = Literal["rapm", "pcm", "lcm"]
# The sections each method reads besides ``training``; the others cannot change what it computes
# and stay out of its run's hash.
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "rapm": ("pointwise", "adversarial", "rapm"),
    "pcm": ("pointwise", "adversarial", "peer", "pcm"),
    "lcm": ("pointwise", "peer"),
}
METHOD_NAMES = tuple(METHOD_SECTIONS)


class TrainingConfig(FrozenModel):
    """The LoRA student and its optimizer, shared by every method."""

    rank: int = Field(1, ge=1, description="LoRA rank; 1 as in the paper's SDXL run (~7 MB)")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means = rank (scale 1)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the LoRA")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, both optimizers")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, both optimizers")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm per optimizer; None = off")
    gradient_checkpointing: bool = Field(False, description="checkpoint the student's UNet call")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast for UNet and heads on CUDA; LoRA and heads stay fp32")
    # Holding the frozen teacher in bf16 halves the largest resident tensor set (the UNet's
    # weights; rapm plan shows by how much) and computes in bf16 without autocast, so it works on
    # CPU too; peft runs the fp32 LoRA on an fp32 copy of each input and casts its output back.
    weights_dtype: Precision = Field(
        "fp32", description="dtype of the frozen teacher UNet's weights, which it computes in (LoRA and heads stay "
                            "fp32); bf16 works on CPU and CUDA; fp16 needs --mixed-precision fp16 (loss scaling)")
    max_consecutive_nonfinite: int = Field(5, ge=1, description="the run aborts after this many skipped iterations in a row")
    init_seed: int = Field(0, description="seed of the initial LoRA A and head weights")

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.weights_dtype == "fp16" and self.mixed_precision != "fp16":
            # Without the fp16 loss scaler, gradients through fp16 activations underflow to zero.
            raise ValueError("weights_dtype 'fp16' needs mixed_precision 'fp16' (its loss scaling, CUDA only); "
                             "use weights_dtype 'bf16' otherwise")
        return self


class PointwiseConfig(FrozenModel):
    """The pointwise distance between a student position and its target."""

    pointwise: Literal["huber", "l2"] = Field("huber", description="pointwise distance")
    huber_c: float = Field(0.001, gt=0, description="pseudo-Huber c (PCM's 0.001)")


# PCM's adversarial SD 1.5 script (train_pcm_lora_sd15_adv.py): what ``--method pcm
# --pcm-adversarial`` runs with unless an option says otherwise.
PCM_PUBLISHED_ADVERSARIAL = {"lambda_adv": 0.1, "lr_disc": 1e-5, "disc_betas": (0.0, 0.999),
                             "disc_schedule": "alternate"}


class AdversarialConfig(FrozenModel):
    """Discriminator heads on the frozen teacher's features (used only by adversarial losses).

    The defaults are RAPM's; ``--method pcm --pcm-adversarial`` defaults to PCM's published
    settings instead (λ_adv 0.1, lr 1e-5, betas (0, 0.999), alternating steps); options given
    explicitly win either way.
    """

    lambda_adv: float = Field(1.0, ge=0, description="λ_adv: weight of each adversarial G term")
    lr_disc: float = Field(1e-4, gt=0, description="AdamW learning rate of the discriminator heads")
    disc_betas: tuple[float, float] | None = Field(
        None, description="AdamW betas of the heads (default: the LoRA's --betas)")
    disc_schedule: Literal["simultaneous", "alternate"] = Field(
        "simultaneous", description="both optimizers step every iteration, or D on even and G on odd iterations")
    gen_loss: Literal["hinge", "linear"] = Field("hinge", description="G loss: relu(1 − D(fake)) or −D(fake)")
    disc_channels: int = Field(256, ge=1, description="inner width of every discriminator head")
    disc_layout: Literal["down-mid", "pcm"] = Field(
        "down-mid", description="feature maps the heads read: the teacher's down and mid blocks with one head each, "
                                "or PCM's layout (down, mid and up blocks, four heads per feature map)")

    @model_validator(mode="after")
    def _check(self) -> "AdversarialConfig":
        if self.disc_betas is not None and not all(0.0 <= b < 1.0 for b in self.disc_betas):
            raise ValueError(f"disc_betas must lie in [0, 1), got {self.disc_betas}")
        return self


class RapmConfig(FrozenModel):
    """RAPM's own options: which positions are matched, how, and over which slots."""

    relative_offset: int = Field(1, ge=0, description="d: fine steps into the slot for the relative target")
    slots_per_iteration: Literal["all", "random"] = Field(
        "all", description="all slots per iteration, or one slot drawn from the run's generator")
    loss_relative: LossMode = Field("pointwise", description="ℓ_rel: adversarial, pointwise, both or off")
    loss_absolute: LossMode = Field("pointwise", description="ℓ_abs: adversarial, pointwise, both or off")
    lambda_rel: float = Field(1.0, ge=0, description="λ_rel")
    lambda_abs: float = Field(1.0, ge=0, description="λ_abs")

    @model_validator(mode="after")
    def _check(self) -> "RapmConfig":
        if self.loss_relative == "off" and self.loss_absolute == "off":
            raise ValueError("loss_relative and loss_absolute are both 'off': nothing to train")
        return self

    def mode(self, kind: TargetKind) -> str:
        return self.loss_relative if kind == "rel" else self.loss_absolute

    def adversarial(self, kind: TargetKind) -> bool:
        return self.mode(kind) in ("adversarial", "both")

    def pointwise_on(self, kind: TargetKind) -> bool:
        return self.mode(kind) in ("pointwise", "both")

    def weight(self, kind: TargetKind) -> float:
        return self.lambda_rel if kind == "rel" else self.lambda_abs


class PeerConfig(FrozenModel):
    """What the consistency peers (PCM, LCM-LoRA) share: their data and their online teacher step."""

    x0_source: Literal["store", "renders"] = Field(
        "store", description="clean latents x0: the store's final teacher positions (data-free, as RAPM), or real "
                             "renders of the prompts through the VAE (a domain that renders, e.g. the shapes)")
    teacher_guidance: tuple[float, float] | None = Field(
        None, description="CFG scale range of the teacher's online solver step, drawn per iteration "
                          "(default: the store's guidance; PCM's SD 1.5 script draws "
                          "CFG scale 1 + w with w ~ U[4, 5], i.e. 5 6, LCM's w ~ U[5, 15], i.e. 6 16)")
    solver_steps: int = Field(50, ge=2, le=1000,
                              description="steps of the teacher grid the peers skip along (DDIM; Euler on a flow teacher)")

    @model_validator(mode="after")
    def _check(self) -> "PeerConfig":
        if self.teacher_guidance is not None and not 1.0 <= self.teacher_guidance[0] <= self.teacher_guidance[1]:
            raise ValueError(f"teacher_guidance must be an increasing range ≥ 1, got {self.teacher_guidance}")
        return self


class PcmConfig(FrozenModel):
    """PCM's own option (Wang et al., arXiv 2405.18407)."""

    pcm_adversarial: bool = Field(False, description="add PCM's adversarial term (the discriminator section; "
                                                     "its options default to PCM's published ones: lambda_adv 0.1, "
                                                     "lr_disc 1e-5, disc_betas 0 0.999, disc_schedule alternate)")


class LcmConfig(FrozenModel):
    """LCM-LoRA's own option (Luo et al., arXiv 2311.05556). σ_data is 0.5, as diffusers'
    LCMScheduler fixes it, so the exported scheduler samples what was trained."""

    timestep_scaling: float = Field(10.0, gt=0, description="timestep scaling of the consistency c_skip/c_out")


class MethodConfig(FrozenModel):
    """What one iteration computes: the method, its section and the shared sections."""

    method: MethodName = Field("rapm", description=f"distillation method ({', '.join(METHOD_NAMES)})")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="LoRA and optimizer")
    pointwise: PointwiseConfig = Field(default_factory=PointwiseConfig, description="pointwise distance")
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig, description="discriminator heads")
    rapm: RapmConfig = Field(default_factory=RapmConfig, description="RAPM's options")
    peer: PeerConfig = Field(default_factory=PeerConfig, description="PCM and LCM-LoRA's data and teacher step")
    pcm: PcmConfig = Field(default_factory=PcmConfig, description="PCM's options")
    lcm: LcmConfig = Field(default_factory=LcmConfig, description="LCM-LoRA's options")

    @model_validator(mode="before")
    @classmethod
    def _pcm_published_adversarial(cls, data):
        """PCM's adversarial run defaults to its published discriminator settings; the options
        given (or a recorded config, which holds them all) keep theirs."""
        if isinstance(data, dict) and data.get("method") == "pcm":
            pcm = data.get("pcm") or {}
            on = pcm.get("pcm_adversarial", False) if isinstance(pcm, dict) else pcm.pcm_adversarial
            adversarial = data.get("adversarial") or {}
            if on and isinstance(adversarial, dict):
                data = {**data, "adversarial": {**PCM_PUBLISHED_ADVERSARIAL, **adversarial}}
        return data

    @classmethod
    def from_options(cls, **options) -> "MethodConfig":
        """Build from options named as on the command line (``lr=…, loss_relative=…``): each goes
        to the section that has it (the CLI flattens sections the same way)."""
        data: dict = {}
        for key, value in options.items():
            section = next((name for name, f in cls.model_fields.items()
                            if isinstance(f.annotation, type) and key in f.annotation.model_fields), None)
            if section is None and key not in cls.model_fields:
                raise ValueError(f"unknown distillation option {key!r}")
            if section is None:
                data[key] = value
            else:
                data.setdefault(section, {})[key] = value
        return cls.model_validate(data)

    @property
    def trains_discriminators(self) -> bool:
        """Whether the method trains discriminator heads (RAPM's adversarial targets, PCM's adversarial term)."""
        if self.method == "rapm":
            return self.rapm.adversarial("rel") or self.rapm.adversarial("abs")
        return self.method == "pcm" and self.pcm.pcm_adversarial

    def hashed(self) -> dict:
        """The method's dump without the sections it does not read, which cannot change what it computes."""
        dump = self.model_dump(mode="json", include={"method", "training", *METHOD_SECTIONS[self.method]})
        # weights_dtype came after runs existed: at its default it stays out, so their run dirs keep their hash.
        if dump["training"]["weights_dtype"] == "fp32":
            del dump["training"]["weights_dtype"]
        if dump.get("adversarial", {}).get("disc_layout") == "down-mid":  # likewise disc_layout
            del dump["adversarial"]["disc_layout"]
        return dump


MAX_ITERATIONS = 1_000_000_000


class DistillOptions(MethodConfig):
    """How a run trains: the method, how long, how often it saves."""

    # The paper's SDXL run: 20K iterations at batch size 1. The upper bound only catches a typo
    # (1e21): a billion iterations is years of training.
    iterations: int = Field(20000, ge=1, le=MAX_ITERATIONS,
                            description="total optimizer steps (extend a finished run by raising it)")
    checkpoint_every: int = Field(500, ge=1, le=MAX_ITERATIONS,
                                  description="save a checkpoint every this many iterations (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept on disk (oldest deleted first)")
    preview_prompts: int = Field(4, ge=0, le=16, description="at every checkpoint, draw the student's samples of this "
                                 "many eval prompts beside the teacher's N·M-step reference into RUN/previews/ "
                                 "(0: no previews)")

    def method_config(self) -> MethodConfig:
        return MethodConfig.model_validate(self.model_dump(include=set(MethodConfig.model_fields)))


class DistillRunConfig(DistillOptions):
    """Stage B: distil the teacher of a trajectory store into a few-step LoRA student."""

    trajectories: str = Field(description="trajectory store (made by `rapm trajectories`)")
    out: str = Field(description="run dir to create, or to resume/extend if it was made with the same config")
    seed: int = Field(0, ge=0, description="seed of the data order and of all training noise (weights init: --init-seed)")
    device: Device = Field("auto", description="compute device")

    def hashed(self) -> dict:
        """What names the run: the method and the seed (not where, how long or how often it saves)."""
        return {**self.method_config().hashed(), "seed": self.seed}
