"""The exported model card lists each setting once (the run's own card values never repeat a row)."""

from __future__ import annotations

from peft import LoraConfig

from rapm_core.distill.export import write_model_card
from rapm_core.ode import StockSampler


def test_teacher_is_listed_once(tmp_path):
    write_model_card(tmp_path, teacher="runwayml/stable-diffusion-v1-5", sampler=StockSampler({"_class_name": "DDIMScheduler"}, 4),
                     steps_per_slot=10,
                     lora=LoraConfig(r=4, lora_alpha=4), sdxl=False,
                     extra={"teacher": "runwayml/stable-diffusion-v1-5", "iterations": 20})
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert card.count("| teacher |") == 1 and "| iterations | 20 |" in card
