"""The text conditioning a denoiser call needs, for SD 1.5, SDXL and SD3 classes alike.

Stored once per prompt by the trajectory stage, so distillation and the discriminators never
load a text encoder. SDXL adds pooled text embeddings and the six "time ids"
(original size, crop offset, target size) through ``added_cond_kwargs``; SD3 has the joint
(CLIP + T5) embeddings and the pooled ones, no time ids.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Conditioning:
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P), SDXL and SD3
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray | None] | Sequence[Mapping[str, np.ndarray | None]],
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "Conditioning":
        """Stored arrays (a store's row or its uncond row, keyed by field name) → conditioning.

        A sequence of per-trajectory mappings (no batch axis) is stacked into one batch.
        """
        if not isinstance(arrays, Mapping):
            rows = list(arrays)
            arrays = {f.name: None if rows[0][f.name] is None else np.stack([r[f.name] for r in rows])
                      for f in fields(cls)}

        def tensor(name: str) -> torch.Tensor | None:
            value = arrays.get(name)
            if value is None:
                return None
            return torch.from_numpy(np.asarray(value, dtype=np.float32)).to(device=device, dtype=dtype)

        return cls(*(tensor(f.name) for f in fields(cls)))

    def to_arrays(self, dtype: str) -> dict[str, np.ndarray | None]:
        """The arrays a trajectory store keeps (cast to its embedding dtype), keyed by field name."""
        def array(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().float().cpu().numpy().astype(dtype)

        return {f.name: array(getattr(self, f.name)) for f in fields(self)}

    @property
    def is_sdxl(self) -> bool:
        return self.time_ids is not None

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward`` besides sample and timestep."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        return kwargs

    def tensors(self) -> list[torch.Tensor]:
        """The tensors it holds (one for SD 1.5, two for SD3, three for SDXL)."""
        return [t for t in (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids) if t is not None]

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
