"""Recipe for the embedded teacher: a Stable-Diffusion-class pipeline trained on shapes renders.

Three stages, each the SD recipe in miniature: an AutoencoderKL (32×32 → 8×8×4) trained on
renders with reconstruction + a small KL; latents encoded once, scaled by 1/std as SD's
``scaling_factor`` does; then a UNet2DConditionModel and a word-level CLIP text encoder trained
jointly on epsilon prediction with 10 % empty captions, so classifier-free guidance works. An
EMA of both is what gets saved. The result is a plain ``StableDiffusionPipeline`` directory.

The UNet stage checkpoints to ``<out>/_checkpoint`` and resumes from it, so a long CPU run that
is interrupted loses at most ``checkpoint_every`` steps; the VAE stage resumes from ``<out>/vae``.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rapm_shapes.evaluator import images_from_uint8
from rapm_shapes.logbook import Logbook
from rapm_shapes.shapes import all_prompts, caption, make_dataset, vocabulary
from rapm_shapes.tokenizer import write_word_tokenizer

MAX_TOKENS = 16  # BOS + the 7 caption words + EOS, with room to spare


def sd_scheduler() -> DDIMScheduler:
    """SD's training schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps), epsilon target."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_vae(width: int) -> AutoencoderKL:
    # Four channels per norm group: with one channel per group GroupNorm becomes InstanceNorm,
    # which normalises each colour channel per image and loses the shape's colour.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=max(1, width // 4), sample_size=32,
    )


def build_text_encoder(vocab_size: int, dim: int, layers: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu",
    ))


def build_unet(width: int, layers: int, text_dim: int, levels: int = 3) -> UNet2DConditionModel:
    # A convolutional UNet is blind to absolute position except through zero padding at the
    # border, and "at the left" is an absolute position: with only an 8×8 and a 4×4 level the
    # teacher learned colour and size but put shapes anywhere (position right 17 % of the time,
    # chance is 20 %). A 2×2 bottom level, where every pixel touches a different pair of borders,
    # hands every location a quadrant code cheaply.
    widths = tuple(width * min(2 ** i, 2) for i in range(levels))
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=text_dim, attention_head_dim=4,
        norm_num_groups=16,
    )


def _warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, *, steps: int, batch: int, lr: float, kl_weight: float,
              gen: torch.Generator, log: Logbook, log_every: int) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, min(200, steps // 10), steps)
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, images.shape[0], (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.write(event="vae", step=step, recon=round(rec.item(), 5), kl=round(kl.item(), 4))
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (sampled per step during UNet training)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def caption_ids(tokenizer: CLIPTokenizer, attrs: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every caption (row 0: the empty caption, for CFG dropout) and each image's row:
    one text-encoder forward over this fixed set per step conditions the whole batch."""
    prompts = [""] + all_prompts()
    prompt_id = {p: i for i, p in enumerate(prompts)}
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    return ids, torch.tensor([prompt_id[caption(a)] for a in attrs])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def high_noise_loss_weights(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-timestep weight of the epsilon loss: min(max(1, 1/SNR), cap).

    Where a shape will stand is settled at high noise, where the epsilon loss is SNR × the x0
    loss (0.005× at t = 999): plain epsilon training (cap 1) learned colour and size but left
    position at chance. Weighting by 1/SNR restores the x0 error there; the cap keeps those
    steps from crowding out the low-noise ones that carry shape detail (see the teacher's card).
    """
    return ((1 - alphas_cumprod) / alphas_cumprod).clamp(min=1.0, max=cap)


def train_teacher(out_dir: str | Path, *, seed: int, n_images: int, vae_steps: int, vae_batch: int, vae_lr: float,
                  kl_weight: float, vae_width: int, text_dim: int, text_layers: int, unet_width: int,
                  unet_layers: int, unet_levels: int, unet_steps: int, unet_batch: int, unet_lr: float, warmup: int,
                  ema_decay: float, cond_dropout: float, high_noise_weight: float, checkpoint_every: int,
                  log_every: int) -> Path:
    """Train the teacher into ``out_dir`` (a StableDiffusionPipeline directory) and return it.

    No defaults here: ``flows.recipe.TeacherRecipe`` holds them, documented, in one place.
    """
    out_dir = Path(out_dir)
    log = Logbook(out_dir / "training_log.jsonl")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images_u8, attrs = make_dataset(n_images, seed)
    images = images_from_uint8(images_u8)
    log.write(event="data", n_images=n_images, render_s=round(time.perf_counter() - t0, 2))

    # Stage 1: VAE (resumed from a finished vae/ if present).
    if (out_dir / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(out_dir / "vae").eval()
        log.write(event="vae_resumed")
    else:
        torch.manual_seed(seed)
        vae = build_vae(vae_width)
        t = time.perf_counter()
        train_vae(vae, images, steps=vae_steps, batch=vae_batch, lr=vae_lr, kl_weight=kl_weight, gen=gen, log=log,
                  log_every=log_every)
        log.write(event="vae_done", train_s=round(time.perf_counter() - t, 1))
    t = time.perf_counter()
    lat_mean, lat_std = encode_latents(vae, images)
    scaling = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out_dir / "vae")
    log.write(event="latents_done", encode_s=round(time.perf_counter() - t, 1), scaling_factor=scaling,
              latent_mean=round(float(lat_mean.mean()), 4), posterior_std=round(float(lat_std.mean()), 4))

    # Stage 2: UNet + text encoder on the fixed caption set (one text forward per step covers all).
    # Its own generator, so a UNet stage after a resumed VAE draws what a one-shot run draws.
    gen = torch.Generator().manual_seed(seed + 1)
    tokenizer = write_word_tokenizer(out_dir / "tokenizer", vocabulary(), MAX_TOKENS)
    ids, image_prompt = caption_ids(tokenizer, attrs)
    torch.manual_seed(seed + 1)
    unet = build_unet(unet_width, unet_layers, text_dim, unet_levels)
    text = build_text_encoder(len(tokenizer), text_dim, text_layers)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=unet_lr, weight_decay=1e-2)
    sched = _warmup_cosine(opt, warmup, unet_steps)
    alphas_cumprod = sd_scheduler().alphas_cumprod
    weight = high_noise_loss_weights(alphas_cumprod, high_noise_weight)
    start = 0
    ckpt = out_dir / "_checkpoint" / "state.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text"),
                            (opt, "opt"), (sched, "sched")):
            module.load_state_dict(state[key])
        gen.set_state(state["gen"])
        start = state["step"]
        log.write(event="unet_resumed", step=start)

    unet.train()
    text.train()
    t = time.perf_counter()
    for step in range(start + 1, unet_steps + 1):
        idx = torch.randint(0, n_images, (unet_batch,), generator=gen)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        pid = torch.where(torch.rand(unet_batch, generator=gen) < cond_dropout, 0, image_prompt[idx])
        timesteps = torch.randint(0, 1000, (unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        zt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        embeds = text(ids)[0][pid]
        err = (unet(zt, timesteps, encoder_hidden_states=embeds).sample - noise).pow(2).mean((1, 2, 3))
        loss = (weight[timesteps] * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, ema_decay if step > warmup else 0.0)
        _ema_update(ema_text, text, ema_decay if step > warmup else 0.0)
        if step % log_every == 0 or step == unet_steps:
            log.write(event="unet", step=step, loss=round(loss.item(), 5), lr=sched.get_last_lr()[0],
                      step_s=round((time.perf_counter() - t) / (step - start), 3))
        if step % checkpoint_every == 0 and step < unet_steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "step": step}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    log.write(event="unet_done", train_s=round(time.perf_counter() - t, 1), steps=unet_steps - start)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(out_dir / "_checkpoint", ignore_errors=True)
    return out_dir
