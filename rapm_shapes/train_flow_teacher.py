"""Recipe for the embedded flow teacher: an SD3-architecture pipeline trained with the
rectified-flow objective on shapes renders.

The latent space is the committed shapes teacher's AutoencoderKL (its weights reused as they
are): the recipe encodes the renders once and sets the VAE's ``shift_factor`` (latent mean) and
``scaling_factor`` (1 / std of the shifted latents), which is how SD3's pipeline maps latents to
the VAE and back. Then an ``SD3Transformer2DModel`` and two word-level ``CLIPTextModelWithProjection``
encoders are trained jointly on the velocity target with 10 % empty captions (CFG), and an EMA of
all three is saved as a stock ``StableDiffusion3Pipeline`` directory without T5.

Rectified flow as diffusers' ``FlowMatchEulerDiscreteScheduler`` integrates it:
x_σ = (1 − σ)·x0 + σ·ε, timestep 1000·σ, target velocity ε − x0. σ is drawn logit-normal
(sigmoid of a standard normal, SD3's choice) or uniform.

Without T5 the pipeline appends ``max_sequence_length`` all-zero "T5" tokens to the CLIP tokens,
and the transformer attends to them (no attention mask), so their count changes the output. The
teacher is trained with ``T5_TOKENS`` of them, and every call must pass
``max_sequence_length=T5_TOKENS`` (the card shows the call).
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from rapm_shapes.evaluator import images_from_uint8
from rapm_shapes.logbook import Logbook
from rapm_shapes.shapes import make_dataset, vocabulary
from rapm_shapes.tokenizer import write_word_tokenizer
from rapm_shapes.train_teacher import MAX_TOKENS, _ema_update, _warmup_cosine, caption_ids, encode_latents

T5_TOKENS = MAX_TOKENS  # the zero "T5" tokens every call appends: pass max_sequence_length=T5_TOKENS


def flow_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_text_encoder(vocab_size: int, dim: int, layers: int, projection_dim: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu", projection_dim=projection_dim,
    ))


def build_transformer(*, latent_channels: int, sample_size: int, heads: int, head_dim: int, layers: int,
                      joint_attention_dim: int, pooled_projection_dim: int) -> SD3Transformer2DModel:
    # Patch size 1: every latent pixel is a token, and SD3's fixed 2-D sin-cos position embedding
    # hands each one its absolute place ("at the left" is an absolute position).
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=sample_size,
    )


def prompt_embeddings(text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
                      ids: torch.Tensor, joint_attention_dim: int, t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) for token ``ids``, as ``StableDiffusion3Pipeline.encode_prompt`` computes
    them without T5: each CLIP's penultimate hidden states side by side, padded to the joint width,
    then ``t5_tokens`` zero tokens; pooled = both projections side by side. With grad, for training."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, joint_attention_dim - clip.shape[-1]))
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, joint_attention_dim)
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


def sample_sigmas(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """Training noise levels: ``logit_normal`` (sigmoid of N(0, 1), as SD3) or ``uniform`` on (0, 1)."""
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    if how == "uniform":
        return torch.rand(n, generator=gen)
    raise ValueError(f"unknown sigma sampling {how!r}")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, one σ per sample (the scheduler's ``scale_noise``)."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_loss(transformer: SD3Transformer2DModel, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
              embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: mean squared error of the predicted velocity against ε − x0 at x_σ."""
    v = transformer(noisy_latents(x0, noise, sigmas), encoder_hidden_states=embeds, pooled_projections=pooled, timestep=1000 * sigmas).sample
    return (v - (noise - x0)).pow(2).mean()


def latent_statistics(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Posterior means and stds of ``images``, and the (shift_factor, scaling_factor) that make
    (latent − shift)·scale zero-mean, unit-variance."""
    mean, std = encode_latents(vae, images)
    shift = float(mean.mean())
    return mean, std, shift, float(1.0 / (mean - shift).std())


def train_flow_teacher(out_dir: str | Path, *, vae: str, seed: int, n_images: int, text_dim: int, text_layers: int,
                       projection_dim: int, heads: int, head_dim: int, layers: int, steps: int, batch: int,
                       lr: float, warmup: int, ema_decay: float, cond_dropout: float, sigma_sampling: str,
                       shift: float, checkpoint_every: int, log_every: int) -> Path:
    """Train the flow teacher into ``out_dir`` (a StableDiffusion3Pipeline directory) and return it.

    No defaults here: ``rapm_shapes.recipe.FlowTeacherRecipe`` holds them, documented, in one place.
    """
    out_dir = Path(out_dir)
    log = Logbook(out_dir / "training_log.jsonl")
    t0 = time.perf_counter()
    images_u8, attrs = make_dataset(n_images, seed)
    images = images_from_uint8(images_u8)
    log.write(event="data", n_images=n_images, render_s=round(time.perf_counter() - t0, 2))

    t = time.perf_counter()
    autoencoder = AutoencoderKL.from_pretrained(vae).eval()
    lat_mean, lat_std, shift_factor, scaling = latent_statistics(autoencoder, images)
    autoencoder.register_to_config(shift_factor=shift_factor, scaling_factor=scaling)
    log.write(event="latents_done", vae=str(vae), encode_s=round(time.perf_counter() - t, 1),
              shift_factor=shift_factor, scaling_factor=scaling, posterior_std=round(float(lat_std.mean()), 4))

    gen = torch.Generator().manual_seed(seed + 1)
    tokenizer = write_word_tokenizer(out_dir / "_tokenizer", vocabulary(), MAX_TOKENS)
    ids, image_prompt = caption_ids(tokenizer, attrs)
    torch.manual_seed(seed + 1)
    texts = (build_text_encoder(len(tokenizer), text_dim, text_layers, projection_dim),
             build_text_encoder(len(tokenizer), text_dim, text_layers, projection_dim))
    joint_dim = 2 * text_dim
    transformer = build_transformer(latent_channels=autoencoder.config.latent_channels, sample_size=lat_mean.shape[-1],
                                    heads=heads, head_dim=head_dim, layers=layers, joint_attention_dim=joint_dim,
                                    pooled_projection_dim=2 * projection_dim)
    models = (transformer, *texts)
    emas = tuple(copy.deepcopy(m).eval() for m in models)
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = _warmup_cosine(opt, warmup, steps)
    names = ("transformer", "text_encoder", "text_encoder_2")
    start = 0
    ckpt = out_dir / "_checkpoint" / "state.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for name, m, e in zip(names, models, emas):
            m.load_state_dict(state[name])
            e.load_state_dict(state["ema_" + name])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start = state["step"]
        log.write(event="flow_resumed", step=start)

    for m in models:
        m.train()
    t = time.perf_counter()
    for step in range(start + 1, steps + 1):
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen) - shift_factor) * scaling
        pid = torch.where(torch.rand(batch, generator=gen) < cond_dropout, 0, image_prompt[idx])
        sigmas = sample_sigmas(batch, sigma_sampling, gen)
        noise = torch.randn(x0.shape, generator=gen)
        embeds, pooled = prompt_embeddings(texts, ids, joint_dim, T5_TOKENS)
        loss = flow_loss(transformer, x0, noise, sigmas, embeds[pid], pooled[pid])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for e, m in zip(emas, models):
            _ema_update(e, m, ema_decay if step > warmup else 0.0)
        if step % log_every == 0 or step == steps:
            log.write(event="flow", step=step, loss=round(loss.item(), 5), lr=sched.get_last_lr()[0],
                      step_s=round((time.perf_counter() - t) / (step - start), 3))
        if step % checkpoint_every == 0 and step < steps:
            state = {name: m.state_dict() for name, m in zip(names, models)}
            state |= {"ema_" + name: e.state_dict() for name, e in zip(names, emas)}
            state |= {"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(), "step": step}
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    log.write(event="flow_done", train_s=round(time.perf_counter() - t, 1), steps=steps - start)

    pipe = StableDiffusion3Pipeline(transformer=emas[0], scheduler=flow_scheduler(shift), vae=autoencoder,
                                    text_encoder=emas[1], tokenizer=tokenizer, text_encoder_2=emas[2],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(out_dir / "_checkpoint", ignore_errors=True)
    shutil.rmtree(out_dir / "_tokenizer", ignore_errors=True)
    return out_dir
