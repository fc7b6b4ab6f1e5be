"""The recipes that produce the embedded default assets (shapes evaluator and shapes teacher) and
measure them (``rapm recipe``). Plain functions rather than Prefect flows: they run once, by a
maintainer, and their record is the training log and model card committed beside the weights.

The card quotes the exact command and the options it resolved to, so anyone can reproduce the
assets (bit-for-bit only on the same CPU torch build; the recipe seeds everything it can).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from rapm_core.config import StrictModel
from rapm_core.errors import ConfigError

RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
ADHERENCE_TARGET = 0.95  # what the embedded-default spec asks of N·M-step guided sampling


class EvaluatorRecipe(StrictModel):
    out: str = Field(description="directory to write the evaluator to")
    seed: int = 0
    n_train: int = Field(20000, ge=100, description="training renders")
    n_val: int = Field(2000, ge=10, description="held-out renders for the accuracy check")
    steps: int = Field(700, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(16, ge=4, description="channels of the first conv stage")
    feature_dim: int = Field(128, ge=8, description="size of the penultimate features (domain FID)")
    threads: int = Field(1, ge=1, description="torch CPU threads (1 is fastest on a shared machine)")


class _ShapesTeacherRecipe(StrictModel):
    """What both teacher recipes (UNet and flow) share: the data, the run's bookkeeping, EMA and
    CFG dropout, and the closing measurement."""
    out: str = Field(description="directory to write the pipeline to")
    evaluator: str | None = Field("assets/shapes-evaluator", description="evaluator for the closing measurement (none: skip)")
    seed: int = 0
    n_images: int = Field(12000, ge=16, description="renders the models train on")
    text_dim: int = Field(64, ge=8, description="hidden size of the (each) CLIP text encoder")
    text_layers: int = Field(2, ge=1)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty captions (for CFG)")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(50, ge=1)
    measure_prompts: int = Field(200, ge=2, description="prompts for the closing measurement")
    guidance: list[float] = Field([4.0, 7.5], description="guidance scales to measure (best is reported)")
    threads: int = Field(1, ge=1, description="torch CPU threads (1 is fastest on a shared machine)")


class TeacherRecipe(_ShapesTeacherRecipe):
    """The UNet teacher: a StableDiffusionPipeline (its VAE trained first)."""
    vae_steps: int = Field(3000, ge=1)
    vae_batch: int = Field(32, ge=1)
    vae_lr: float = Field(3e-3, gt=0)
    kl_weight: float = Field(1e-5, ge=0)
    vae_width: int = Field(12, ge=4, description="VAE channels at full resolution (then 2×, 4×)")
    unet_width: int = Field(32, ge=16, description="UNet channels at the 8×8 level (2× below)")
    unet_layers: int = Field(1, ge=1, description="resnet layers per UNet block")
    unet_levels: int = Field(3, ge=2, le=4, description="UNet resolutions: 8×8, 4×4, 2×2, …")
    unet_steps: int = Field(5000, ge=1)
    unet_batch: int = Field(64, ge=1)
    unet_lr: float = Field(2e-3, gt=0)
    warmup: int = Field(100, ge=0)
    high_noise_weight: float = Field(30.0, ge=1, description="cap of the UNet loss weight max(1, 1/SNR): "
                                                            "1 is plain epsilon loss; more teaches position")


class FlowTeacherRecipe(_ShapesTeacherRecipe):
    """The flow teacher: a StableDiffusion3Pipeline trained with the rectified-flow objective."""
    vae: str = Field("assets/shapes-teacher/vae", description="AutoencoderKL whose weights are reused (its shift and "
                                                              "scaling factors are set from the renders' latents)")
    projection_dim: int = Field(32, ge=4, description="each CLIP's projection (pooled = both side by side)")
    heads: int = Field(6, ge=1, description="transformer attention heads")
    head_dim: int = Field(16, ge=4, description="transformer width = heads × head_dim")
    layers: int = Field(4, ge=1, description="joint transformer blocks")
    steps: int = Field(8000, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(200, ge=0)
    sigma_sampling: Literal["logit_normal", "uniform"] = Field("logit_normal", description="training noise levels")
    shift: float = Field(1.0, gt=0, description="the saved scheduler's shift (inference only; the closing "
                                                "measurement replaces it by the best it measured)")


class MeasureRecipe(StrictModel):
    teacher: str = Field(description="teacher pipeline directory")
    evaluator: str = Field("assets/shapes-evaluator", description="evaluator directory")
    n_prompts: int = Field(200, ge=2)
    seed: int = 0
    num_slots: int = Field(4, ge=1, description="N")
    steps_per_slot: int = Field(10, ge=1, description="M")
    guidance: list[float] = Field([4.0, 7.5])
    threads: int = Field(1, ge=1)


class FlowMeasureRecipe(MeasureRecipe):
    """A flow teacher's measurement: also over the scheduler's shift."""
    shift: list[float] = Field([1.0, 2.0, 3.0], description="scheduler shifts to measure; the best is saved "
                                                            "into the teacher's scheduler config")


def _compare(few: float, full: float, higher_is_better: bool) -> str:
    """Says whether the N-step sampler is worse than the N·M-step one on a metric."""
    if few == full:
        return "equal"
    return "worse" if (few < full) == higher_is_better else "better"


def _command() -> str:
    return "rapm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "recipe" in sys.argv else ""


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _log_summary(out: Path) -> str:
    lines = [json.loads(l) for l in (out / "training_log.jsonl").read_text().splitlines() if l.strip()]
    stages = [l for l in lines if l.get("event", "").endswith("done") or l.get("event") in ("data", "held_out")]
    return "\n".join(f"- `{json.dumps(l)}`" for l in stages)


NOTES_MARKER = "<!-- notes: written by hand, kept when the card is regenerated -->"


def _write_card(out: Path, text: str) -> None:
    """Write ``out/README.md``, keeping whatever follows ``NOTES_MARKER`` in the current card (what
    was tried, how a copy was run: words a measurement cannot regenerate)."""
    card = out / "README.md"
    notes = ""
    if card.is_file() and NOTES_MARKER in (old := card.read_text()):
        notes = old[old.index(NOTES_MARKER):]
    card.write_text(text + ("\n" + notes if notes else ""))


def write_evaluator_card(out: Path) -> None:
    recipe = json.loads((out / RECIPE_FILE).read_text())
    metrics = json.loads((out / METRICS_FILE).read_text())
    acc = "\n".join(f"| {k.removeprefix('held_out_accuracy_')} | {v:.4f} |" for k, v in metrics.items()
                    if k.startswith("held_out_accuracy_"))
    (out / "README.md").write_text(f"""# shapes-evaluator

The embedded domain's judge: a small CNN (`rapm_shapes.evaluator.ShapesClassifier`) that
predicts every attribute (shape, colour, size, position) of a 32×32 shapes render. Prompt
adherence = share of images whose predicted attributes all match their prompt; domain FID =
Fréchet distance of its {recipe['options']['feature_dim']}-d penultimate features.

Load: `rapm_shapes.evaluator.load_evaluator("{out}")`.

## Held-out accuracy ({metrics['n_held_out']} fresh renders, a seed training never used)

| attribute | accuracy |
|---|---|
{acc}

(`all` = every attribute right at once.) Training wall time: {metrics['train_s']} s on {recipe['machine']}.

## Recipe

```
{recipe['command'] or 'rapm recipe evaluator ' + '--out ' + recipe['options']['out']}
```

Resolved options: `{json.dumps(recipe['options'])}`

Training log: `training_log.jsonl` (loss every 100 steps). Milestones:

{_log_summary(out)}
""")


def _machine() -> str:
    import platform

    import torch

    return f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), shared with other jobs"


def run_evaluator_recipe(cfg: EvaluatorRecipe) -> dict:
    import torch

    from rapm_shapes.train_evaluator import train_evaluator

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_log.jsonl").unlink(missing_ok=True)
    opts = cfg.model_dump(exclude={"out", "threads"})
    metrics = train_evaluator(out, **opts)
    _write_json(out / RECIPE_FILE, {"command": _command(), "options": cfg.model_dump(), "machine": _machine()})
    _write_json(out / METRICS_FILE, metrics)
    write_evaluator_card(out)
    return metrics


def write_teacher_card(out: Path) -> None:
    recipe = json.loads((out / RECIPE_FILE).read_text())
    metrics = json.loads((out / METRICS_FILE).read_text()) if (out / METRICS_FILE).is_file() else None
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors") / 1e6
    _write_card(out, f"""# shapes-teacher

A small text-to-image latent diffusion model of Stable Diffusion's classes, trained from scratch
on the embedded "shapes" domain (`rapm_shapes.shapes`) by the project's own recipe:
AutoencoderKL (32×32×3 → 8×8×4), word-level CLIPTokenizer + CLIPTextModel, UNet2DConditionModel,
DDIMScheduler with SD's scaled-linear betas, epsilon prediction, 10 % empty captions (CFG).
Weights: {size_mb:.1f} MB of safetensors. Load with stock diffusers:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{out}")
image = pipe("a small red circle at the top", height=32, width=32, num_inference_steps=40,
             guidance_scale=5.0).images[0]
```

Prompts: `"a {{small|large}} {{red|yellow|green|blue}} {{circle|square|triangle}} at the
{{left|right|top|bottom|centre}}"` (`rapm_shapes.shapes.all_prompts()`); other words are unknown.

## Measured quality

{_metrics_section(metrics)}

## Recipe

```
{recipe['command'] or 'rapm recipe teacher --out ' + recipe['options']['out']}
```

Resolved options: `{json.dumps(recipe['options'])}`

Machine: {recipe['machine']}. Training log: `training_log.jsonl`. Milestones:

{_log_summary(out)}
""")


DDIM_NOTE = ("trailing DDIM via `rapm_core.sampler.ddim_sample`, decoded with "
             "`vae.decode(latents / scaling_factor)`")


def _metrics_section(metrics: dict | None, sampler_note: str = DDIM_NOTE, measure_cmd: str = "rapm recipe measure") -> str:
    if metrics is None:
        return f"Not measured yet: run `{measure_cmd} --teacher DIR`."
    # Settings a sampler was measured at (guidance; for flows also the shift): one column each.
    settings = [k for k in ("shift", "guidance") if k in metrics["rows"][0]]
    rows = "\n".join(f"| {r['sampler']} | {r['steps']} | " + "".join(f"{r[k]} | " for k in settings)
                     + f"{r['adherence']:.3f} | {r['domain_fid']:.2f} | {r['wall_s']} |" for r in metrics["rows"])
    chosen_rows = [r for r in metrics["rows"] if all(r[k] == metrics[k] for k in settings)]
    full = next(r for r in chosen_rows if r["steps"] > metrics["num_slots"])
    few = next(r for r in chosen_rows if r["steps"] == metrics["num_slots"])
    sampler = few["sampler"]
    status = ("meets" if full["adherence"] >= ADHERENCE_TARGET else "**falls short of**")
    chosen = ", ".join(f"{k} **{metrics[k]}**" for k in settings)
    return f"""Status: N·M-step adherence {full['adherence']:.3f} {status} the {ADHERENCE_TARGET:.0%} target of the
embedded-default spec. N-step {sampler}: adherence {few['adherence']:.3f} ({_compare(few['adherence'], full['adherence'], True)}),
domain FID {few['domain_fid']:.1f} vs {full['domain_fid']:.1f} ({_compare(few['domain_fid'], full['domain_fid'], False)}).

Measured by `{metrics['command'] or measure_cmd}` with the evaluator in `{metrics['evaluator']}`:
{metrics['n_prompts']} prompts (every attribute combination, cycled), one seeded initial noise each,
{sampler_note}.
Adherence = share of images whose predicted attributes all match the prompt; domain FID against
real renders of the same prompts. Floors and ceilings: real-vs-real FID between two render seeds
{metrics['real_vs_real_fid']:.2f}; the VAE alone (encode → decode of the real renders) reaches adherence
{metrics['vae_roundtrip_adherence']:.3f} and FID {metrics['vae_roundtrip_fid']:.2f}.
Chosen: {chosen} (best N·M-step adherence, then FID, of the rows below).

| sampler | steps | {' | '.join(settings)} | adherence | domain FID | wall s |
|---|---|{'---|' * len(settings)}---|---|---|
{rows}

![samples](samples.png)

`samples.png`, same prompts per column: real renders; N·M-step {sampler}; N-step {sampler} (chosen settings).
"""


def _require_pipeline(directory: Path, class_name: str, other_command: str) -> None:
    index = directory / "model_index.json"
    found = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if found != class_name:
        raise ConfigError(f"--teacher {directory}: expected a {class_name} directory, found "
                          f"{found or 'no model_index.json'}" + (f" (measure it with `{other_command}`)" if found else ""))


def run_measure(cfg: "MeasureRecipe") -> dict:
    import torch

    from rapm_shapes.measure import measure_teacher

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.teacher)
    _require_pipeline(out, "StableDiffusionPipeline", "rapm recipe measure-flow")
    metrics = measure_teacher(out, cfg.evaluator, n_prompts=cfg.n_prompts, seed=cfg.seed, num_slots=cfg.num_slots,
                              steps_per_slot=cfg.steps_per_slot, guidances=cfg.guidance)
    metrics |= {"command": _command(), "evaluator": cfg.evaluator}
    _write_json(out / METRICS_FILE, metrics)
    if (out / RECIPE_FILE).is_file():
        write_teacher_card(out)
    return metrics


def _run_recipe(cfg: TeacherRecipe | FlowTeacherRecipe, train, write_card, measure) -> Path:
    """Train into ``cfg.out``, record the recipe, write the card, then measure unless the evaluator
    is none (the measurement rewrites the card with its numbers)."""
    import torch

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train(out, **cfg.model_dump(exclude={"out", "threads", "evaluator", "measure_prompts", "guidance"}))
    _write_json(out / RECIPE_FILE, {"command": _command(), "options": cfg.model_dump(), "machine": _machine()})
    (out / METRICS_FILE).unlink(missing_ok=True)
    write_card(out)
    if cfg.evaluator and cfg.evaluator != "none":
        measure(teacher=cfg.out, evaluator=cfg.evaluator, n_prompts=cfg.measure_prompts, guidance=cfg.guidance,
                threads=cfg.threads)
    return out


def run_teacher_recipe(cfg: TeacherRecipe) -> Path:
    from rapm_shapes.train_teacher import train_teacher

    return _run_recipe(cfg, train_teacher, write_teacher_card, lambda **kw: run_measure(MeasureRecipe(**kw)))


def run_flow_teacher_recipe(cfg: FlowTeacherRecipe) -> Path:
    from rapm_shapes.train_flow_teacher import train_flow_teacher

    return _run_recipe(cfg, train_flow_teacher, write_flow_teacher_card,
                       lambda **kw: run_flow_measure(FlowMeasureRecipe(**kw)))


def run_flow_measure(cfg: FlowMeasureRecipe) -> dict:
    """Measure a flow teacher with the stock pipeline and save the best shift into its scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from rapm_shapes.measure import measure_flow_teacher
    from rapm_shapes.train_flow_teacher import T5_TOKENS

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.teacher)
    _require_pipeline(out, "StableDiffusion3Pipeline", "rapm recipe measure")
    metrics = measure_flow_teacher(out, cfg.evaluator, max_sequence_length=T5_TOKENS, n_prompts=cfg.n_prompts,
                                   seed=cfg.seed, num_slots=cfg.num_slots, steps_per_slot=cfg.steps_per_slot,
                                   guidances=cfg.guidance, shifts=cfg.shift)
    metrics |= {"command": _command(), "evaluator": cfg.evaluator, "max_sequence_length": T5_TOKENS}
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=metrics["shift"]).save_pretrained(out / "scheduler")
    _write_json(out / METRICS_FILE, metrics)
    if (out / RECIPE_FILE).is_file():
        write_flow_teacher_card(out)
    return metrics


FLOW_NOTE = ("the stock `StableDiffusion3Pipeline(prompts, latents=noise, num_inference_steps=steps, "
             "guidance_scale=w, height=32, width=32, max_sequence_length={t5}, output_type=\"pt\")` with the "
             "scheduler's `shift` set per row (its Euler loop, CFG and `vae.decode(latents / scaling_factor + "
             "shift_factor)`). The prompts are the domain's own captions (the closed vocabulary holds no "
             "others); noise and reference renders are held out (seeds training never drew)")


def write_flow_teacher_card(out: Path) -> None:
    from rapm_shapes.train_flow_teacher import T5_TOKENS

    recipe = json.loads((out / RECIPE_FILE).read_text())
    metrics = json.loads((out / METRICS_FILE).read_text()) if (out / METRICS_FILE).is_file() else None
    opts = recipe["options"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors") / 1e6
    guidance = metrics["guidance"] if metrics else opts["guidance"][0]
    _write_card(out, f"""# shapes-flow-teacher

A small text-to-image model of Stable Diffusion 3's classes, trained with the rectified-flow
objective on the embedded "shapes" domain (`rapm_shapes.shapes`) by the project's own recipe:
`SD3Transformer2DModel` (patch size 1 on 8×8×4 latents, {opts['layers']} joint blocks, width
{opts['heads'] * opts['head_dim']}), two word-level `CLIPTextModelWithProjection` encoders trained with it, no T5,
the shapes teacher's `AutoencoderKL` weights with `shift_factor`/`scaling_factor` set from the
renders' latents, `FlowMatchEulerDiscreteScheduler` with shift {scheduler['shift']}, 10 % empty
captions (CFG). Weights: {size_mb:.1f} MB of safetensors. Load with stock diffusers:

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("assets/shapes-flow-teacher", text_encoder_3=None, tokenizer_3=None)
image = pipe("a small red circle at the top", height=32, width=32, num_inference_steps=40,
             guidance_scale={guidance}, max_sequence_length={T5_TOKENS}).images[0]
```

`max_sequence_length={T5_TOKENS}` matters: without T5 the pipeline appends that many all-zero T5
tokens, the transformer attends to them, and the teacher was trained with {T5_TOKENS} (the default
256 gives other images). Prompts: `"a {{small|large}} {{red|yellow|green|blue}}
{{circle|square|triangle}} at the {{left|right|top|bottom|centre}}"`; other words are unknown.

Training objective: x_σ = (1 − σ)·x0 + σ·ε, timestep 1000·σ, target velocity ε − x0, σ drawn
{'logit-normal (sigmoid of N(0, 1), as SD3)' if opts['sigma_sampling'] == 'logit_normal' else 'uniform on (0, 1)'};
an EMA (decay {opts['ema_decay']}) of the transformer and both text encoders is what is saved.

## Measured quality

{_metrics_section(metrics, FLOW_NOTE.format(t5=T5_TOKENS), "rapm recipe measure-flow")}

## Recipe

```
{recipe['command'] or 'rapm recipe flow-teacher --out ' + opts['out']}
```

Resolved options: `{json.dumps(opts)}`

Machine: {recipe['machine']}. Training log: `training_log.jsonl`. Milestones:

{_log_summary(out)}
""")
