"""The published architecture configs of SD 1.5, SDXL base 1.0, SD3 Medium and SD3.5 Medium / Large,
as their repositories ship them.

Copied key for key from ``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``, ``stabilityai/stable-diffusion-3-medium-diffusers``,
``stabilityai/stable-diffusion-3.5-medium`` and ``stabilityai/stable-diffusion-3.5-large``
(``unet/`` or ``transformer/``, ``text_encoder*/``, ``vae/`` and ``scheduler/`` config files,
``model_index.json``), so the planner builds exactly the modules a user of those teachers loads —
without their weights. Tokenizer files are not needed: the planner only needs the sequence
lengths, CLIP's ``max_position_embeddings`` and, for T5, the pipeline's ``max_sequence_length``.
Bookkeeping keys that build nothing (``_name_or_path``, ``transformers_version``…) are kept where
the files have them; the SD3-class files are written with the keys that shape a module.
"""

from __future__ import annotations

import copy

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# CLIP ViT-L/14's text tower: SD 1.5's only text encoder and SDXL's first one.
_CLIP_L = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}

_SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}

_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

_SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_SDXL_CLIP_L = {**_CLIP_L, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0"}

# OpenCLIP ViT-bigG/14's text tower with its 1280-d projection (the pooled embedding).
_SDXL_CLIP_G = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}

# The same VAE layout as SD 1.5's; SDXL's file adds the fp16 upcast flag and its own latent scale.
_SDXL_VAE = {**_SD15_VAE, "_diffusers_version": "0.20.0.dev0", "force_upcast": True, "sample_size": 1024,
             "scaling_factor": 0.13025}

_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# -- SD3 class: an MMDiT transformer on 16-channel latents, two CLIPs with projections and T5-XXL --
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2 B parameters in the
# model card; 2.03 B parameters plus the 192² position grid, a persistent buffer).
_SD3_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.29.0.dev0",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json: MMDiT-X (a second self-attention
# in the first 13 blocks, RMS q/k norm, a 384² position grid; 2.5 B in the model card).
_SD35_MEDIUM_TRANSFORMER = {
    **_SD3_MEDIUM_TRANSFORMER,
    "_diffusers_version": "0.31.0.dev0",
    "dual_attention_layers": list(range(13)),
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}

# stabilityai/stable-diffusion-3.5-large, transformer/config.json (8.1 B in the model card).
_SD35_LARGE_TRANSFORMER = {
    **_SD3_MEDIUM_TRANSFORMER,
    "_diffusers_version": "0.31.0.dev0",
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}

# text_encoder/ and text_encoder_2/: the same CLIP-L and OpenCLIP bigG towers as SDXL's, both with
# their projection (the two pooled outputs side by side are the transformer's 2048-d pooled input).
_SD3_CLIP_L = {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "torch_dtype": "float16"}
_SD3_CLIP_G = {**_SDXL_CLIP_G}

# text_encoder_3/: google/t5-v1_1-xxl's encoder (4.7 B parameters).
_SD3_T5_XXL = {
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32128,
}

# vae/: SDXL's layout with 16 latent channels, no quant convs, and SD3's latent shift and scale.
_SD3_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.29.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

_SD3_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

_SD3_MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.29.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SD35_MODEL_INDEX = {**_SD3_MODEL_INDEX, "_diffusers_version": "0.31.0.dev0"}


def _sd3(transformer: dict, index: dict) -> dict[str, dict]:
    return {"model_index": index, "transformer": transformer, "text_encoder": _SD3_CLIP_L,
            "text_encoder_2": _SD3_CLIP_G, "text_encoder_3": _SD3_T5_XXL, "vae": _SD3_VAE,
            "scheduler": _SD3_SCHEDULER}


# Preset name → (hub id it describes, the config files by subfolder).
PRESETS: dict[str, tuple[str, dict[str, dict]]] = {
    "sd15": ("runwayml/stable-diffusion-v1-5", {
        "model_index": _SD15_MODEL_INDEX, "unet": _SD15_UNET, "text_encoder": _CLIP_L,
        "vae": _SD15_VAE, "scheduler": _SD15_SCHEDULER,
    }),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", {
        "model_index": _SDXL_MODEL_INDEX, "unet": _SDXL_UNET, "text_encoder": _SDXL_CLIP_L,
        "text_encoder_2": _SDXL_CLIP_G, "vae": _SDXL_VAE, "scheduler": _SDXL_SCHEDULER,
    }),
    "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", _sd3(_SD3_MEDIUM_TRANSFORMER, _SD3_MODEL_INDEX)),
    "sd35-medium": ("stabilityai/stable-diffusion-3.5-medium", _sd3(_SD35_MEDIUM_TRANSFORMER, _SD35_MODEL_INDEX)),
    "sd35-large": ("stabilityai/stable-diffusion-3.5-large", _sd3(_SD35_LARGE_TRANSFORMER, _SD35_MODEL_INDEX)),
}


def preset_configs(name: str) -> tuple[str, dict[str, dict]]:
    """(hub id, config dicts by subfolder) of a preset; deep copies, so callers may edit them."""
    hub_id, configs = PRESETS[name]
    return hub_id, copy.deepcopy(configs)
