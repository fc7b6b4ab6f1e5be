"""Tiny random-weight Stable Diffusion 3-class pipelines, built from config offline.

The same component classes as SD3 / SD3.5 (``SD3Transformer2DModel``, two
``CLIPTextModelWithProjection`` with a CLIP tokenizer each, optionally ``T5EncoderModel``, a
16-channel ``AutoencoderKL`` with ``shift_factor``/``scaling_factor``,
``FlowMatchEulerDiscreteScheduler``) at a size that runs in milliseconds on a CPU, saved as a
pipeline directory that stock ``StableDiffusion3Pipeline.from_pretrained`` loads.

The dimensions tie together as SD3's do: the two CLIPs' projections side by side are the
transformer's pooled projection; their hidden states side by side, padded to T5's width, are its
``joint_attention_dim``. The T5 tokenizer is a Unigram model over characters (T5's tokenizer
class expects a Unigram vocabulary; a WordLevel one does not reload).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from rapm_testing.tiny_teacher import TEXT_DIM, clip_text_config, char_tokenizer

CLIP_PROJECTION = 16
T5_DIM = 2 * TEXT_DIM + 16  # wider than both CLIPs side by side, so the pipeline's padding is exercised
LATENT_CHANNELS = 16
# The T5 tokens per prompt the tests' stores and pipeline calls use (zeros without T5): few, for speed.
TEST_T5_TOKENS = 8


def t5_char_tokenizer(max_length: int = 32) -> T5TokenizerFast:
    """A T5TokenizerFast whose pieces are characters (with and without the word-start mark)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def _t5(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
        shift_factor=0.0609, scaling_factor=1.5305,  # SD3's published values
    )


def tiny_sd3_transformer(joint_attention_dim: int, sd35: bool = False) -> SD3Transformer2DModel:
    """Two joint blocks on 16×16 latents, patch size 2; ``sd35`` adds SD3.5's options (RMS q/k norm,
    a dual-attention block)."""
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=16, pooled_projection_dim=2 * CLIP_PROJECTION, pos_embed_max_size=16, **extra,
    )


def build_tiny_sd3(directory: str | Path, seed: int = 0, with_t5: bool = True, sd35: bool = False,
                   shift: float = 3.0) -> Path:
    """Save a random SD3-class pipeline (16×16 latents, 32×32 images) to ``directory`` and return it.

    Without T5 the directory records ``text_encoder_3``/``tokenizer_3`` as absent, so load it with
    ``StableDiffusion3Pipeline.from_pretrained(directory, text_encoder_3=None, tokenizer_3=None)``.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    tok = char_tokenizer()
    t5_tok = t5_char_tokenizer() if with_t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(T5_DIM if with_t5 else 2 * TEXT_DIM, sd35),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=_vae(),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(projection_dim=CLIP_PROJECTION)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(projection_dim=CLIP_PROJECTION)), tokenizer_2=tok,
        text_encoder_3=_t5(len(t5_tok)) if with_t5 else None, tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def load_tiny_sd3(directory: str | Path) -> StableDiffusion3Pipeline:
    """Load a ``build_tiny_sd3`` directory with stock diffusers, with or without its T5."""
    index = (Path(directory) / "model_index.json").read_text()
    has_t5 = '"T5EncoderModel"' in index
    extra = {} if has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(directory, **extra)
