"""What the evaluation tests build: a tiny finished run, a tiny CLIP model and a tiny exported
feature network standing in for Inception (random weights, real file formats)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill_support import method_config
from rapm_core.distill.config import DistillRunConfig
from rapm_core.distill.run import run_distillation
from rapm_testing.tiny_teacher import char_tokenizer
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from rapm_shapes.shapes import all_prompts
from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.engine import ingest_prompts

PROMPTS = all_prompts()[::7][:12]  # shapes captions, so a shapes evaluator can judge them


def build_tiny_run(root: Path, teacher_dir: Path, iterations: int = 3) -> tuple[Path, Path, Path]:
    """prompt store → trajectory store (N=2, M=2) → a few distillation iterations, by the stages' own functions."""
    source = root / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    prompts = root / "prompts"
    ingest_prompts(IngestConfig(source=str(source), out=str(prompts), eval_fraction=0.4, seed=1))
    store = root / "trajectories.zarr"
    generate_trajectories(TrajectoriesConfig(prompts=str(prompts), teacher=str(teacher_dir), out=str(store), slots=2,
                                             steps_per_slot=2, guidance=3.0, device="cpu", batch_size=8),
                          log=lambda _: None)
    run = root / "run"
    method = method_config(disc_channels=8, lr=1e-2, lr_disc=1e-2, loss_relative="both", loss_absolute="both")
    run_distillation(DistillRunConfig(trajectories=str(store), out=str(run), iterations=iterations,
                                      checkpoint_every=iterations, device="cpu", **dict(method)), log=lambda _: None)
    return prompts, store, run


def build_tiny_clip(d: Path) -> Path:
    """A random CLIPModel and its processor saved as a local directory, as a user's CLIP would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = char_tokenizer(max_length=77)
    torch.manual_seed(0)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    # A random CLIP's cosines hover around 0, where the metric clips; a shared offset in both towers'
    # final norms makes them positive and input-dependent, so the score is a real number to check.
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.fill_(2.0)
        model.text_model.final_layer_norm.bias.fill_(2.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(d)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(d)
    return d


class TinyFeatures(nn.Module):
    """A fixed random conv feature network over uint8 images, standing in for Inception."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 127.5 - 1)


def export_tiny_features(path: Path, size: int = 32, seed: int = 0) -> Path:
    """TinyFeatures saved with torch.export (any batch size, ``size``² images): a --fid-weights .pt2."""
    net = TinyFeatures(seed).eval()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path
