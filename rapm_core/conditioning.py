"""The text conditioning a UNet call needs, for SD 1.5 and SDXL classes alike.

Stored once per prompt by the trajectory stage, so distillation and the discriminators never
load a text encoder. SDXL adds pooled text embeddings and the six "time ids"
(original size, crop offset, target size) through ``added_cond_kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Conditioning:
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P), SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only

    @property
    def is_sdxl(self) -> bool:
        return self.pooled_prompt_embeds is not None

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward`` besides sample and timestep."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        return kwargs

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, prompt_embeds=move(self.prompt_embeds),
                       pooled_prompt_embeds=move(self.pooled_prompt_embeds), time_ids=move(self.time_ids))

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Batch-concatenate (used to run uncond and cond in one UNet call for CFG)."""
        def c(a, b):
            return None if a is None else torch.cat([a, b])

        return Conditioning(c(self.prompt_embeds, other.prompt_embeds),
                            c(self.pooled_prompt_embeds, other.pooled_prompt_embeds), c(self.time_ids, other.time_ids))

    def __getitem__(self, idx) -> "Conditioning":
        def g(t):
            return None if t is None else t[idx]

        return Conditioning(g(self.prompt_embeds), g(self.pooled_prompt_embeds), g(self.time_ids))
