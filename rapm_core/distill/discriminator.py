"""PCM-style latent discriminators: the frozen teacher's denoiser as backbone, small trainable heads.

The backbone is read, not rebuilt: forward hooks collect every down-block output and the
mid-block output of the teacher UNet (adapters bypassed), and the last tapped block's hook aborts
the forward so nothing after it is computed. Two layouts: "down-mid" (the default: one head per
down/mid feature map, the up path never runs) and "pcm" (PCM's published discriminator: the
up-block outputs too, four heads per feature map). An SD3-class transformer is read the same way
at every joint block's image-stream output, its tokens laid back on the latent's patch grid (the
final norm and projection never run); it has no up path, so only "down-mid" applies. RAPM keeps
two head sets, one judging relative positions and one judging absolute positions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from rapm_core.conditioning import Conditioning
from rapm_core.denoiser import denoise, is_transformer
from rapm_core.errors import ConfigError
from rapm_core.distill.student import teacher_mode


# Feature maps read and heads per map of each layout (PCM: discriminator_sd15.py's nine maps, four heads each).
LAYOUTS: dict[str, tuple[bool, int]] = {"down-mid": (False, 1), "pcm": (True, 4)}


class _FeaturesCollected(Exception):
    """Raised from the last tapped block's hook to skip the rest; never leaves ``FeatureTaps``."""


@contextmanager
def _no_gradient_checkpointing(unet: nn.Module) -> Iterator[None]:
    # Non-reentrant checkpointing recomputes a block during backward, by which time the adapters
    # are enabled again: the backbone would be recomputed as the student. It runs unchecked.
    # The flag lives on a UNet's blocks (on a transformer, on the model itself);
    # ``unet.is_gradient_checkpointing`` would walk every submodule (found costly in
    # bench_distill.py's profile) on each of the two discriminator calls per slot.
    blocks = [unet] if is_transformer(unet) else [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    was_on = any(getattr(b, "gradient_checkpointing", False) for b in blocks)
    if was_on:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was_on:
            unet.enable_gradient_checkpointing()


class FeatureTaps:
    """The teacher's down-block and mid-block outputs (with ``up_blocks``, the up-block outputs
    too) for a (sample, t, c), via forward hooks; of an SD3-class transformer, every joint block's
    image-stream output as a (B, width, H/patch, W/patch) map.

    Gradients flow from the features back to ``sample`` (the generator's path), while the
    backbone's own weights stay frozen.
    """

    def __init__(self, unet: nn.Module, up_blocks: bool = False):
        self.unet = unet
        if is_transformer(unet):
            if up_blocks:
                raise ConfigError("--disc-layout pcm reads a UNet's up blocks; an SD3-class teacher has none: "
                                  "use --disc-layout down-mid")
            self.blocks = list(unet.transformer_blocks)
            width = int(unet.config.num_attention_heads * unet.config.attention_head_dim)
            self.channels: tuple[int, ...] = (width,) * len(self.blocks)
            return
        if getattr(unet, "mid_block", None) is None:
            raise ConfigError("the discriminator reads the teacher UNet's mid block, and this UNet has none")
        self.blocks = [*unet.down_blocks, unet.mid_block, *(unet.up_blocks if up_blocks else [])]
        widths = list(unet.config.block_out_channels)
        self.channels = tuple(widths + [widths[-1]] + (widths[::-1] if up_blocks else []))

    def _feature(self, output, sample: torch.Tensor) -> torch.Tensor:
        if not is_transformer(self.unet):
            return output[0] if isinstance(output, tuple) else output
        # A joint block returns (context, image) streams; the image tokens are the patch grid in
        # row-major order (PatchEmbed's flatten), so they fold back into a feature map.
        tokens = output[1]
        patch = int(self.unet.config.patch_size)
        h, w = sample.shape[-2] // patch, sample.shape[-1] // patch
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def __call__(self, sample: torch.Tensor, t: int, cond: Conditioning) -> list[torch.Tensor]:
        features: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            features.append(self._feature(output, sample))

        def keep_and_stop(module, inputs, output):
            keep(module, inputs, output)
            raise _FeaturesCollected

        handles = [block.register_forward_hook(keep) for block in self.blocks[:-1]]
        handles.append(self.blocks[-1].register_forward_hook(keep_and_stop))
        try:
            with teacher_mode(self.unet), _no_gradient_checkpointing(self.unet):
                denoise(self.unet, sample, t, cond)
        except _FeaturesCollected:
            pass
        finally:
            for h in handles:
                h.remove()
        return features


def _group_count(width: int) -> int:
    return math.gcd(32, width)


class PatchHead(nn.Module):
    """conv→GN→LeakyReLU twice with a residual, then 1×1 conv to one logit per patch (PCM's head,
    with a configurable inner width instead of the feature width to keep SDXL heads small)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(_group_count(width), width), nn.LeakyReLU(),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(_group_count(width), width), nn.LeakyReLU(),
        )
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(x.to(self.out.weight.dtype))
        return self.out(self.block2(h) + h)


class HeadSet(nn.Module):
    """``per_map`` patch heads per tapped feature map; returns their logits in tap order."""

    def __init__(self, channels: Sequence[int], width: int, per_map: int = 1):
        super().__init__()
        self.per_map = per_map
        self.heads = nn.ModuleList(PatchHead(c, width) for c in channels for _ in range(per_map))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        each = [f for f in features for _ in range(self.per_map)]
        return [head(f) for head, f in zip(self.heads, each, strict=True)]
