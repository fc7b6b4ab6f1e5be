"""The distilled student as its export describes it: read the way a user of the LoRA reads it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rapm_core.errors import ConfigError
from rapm_core.ode import StockSampler


@dataclass
class StudentExport:
    directory: Path
    sampler: StockSampler  # the exported scheduler, step count and set_timesteps arguments
    method: str
    # What the stock pipeline call needs besides the sampler (an SD3 teacher's max_sequence_length).
    pipeline_call: dict = field(default_factory=dict)
    loaded: bool = field(default=False, compare=False)

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def load_into(self, pipe) -> None:
        """Load the LoRA into ``pipe`` with stock diffusers and fuse it, as it would be deployed."""
        pipe.load_lora_weights(str(self.directory))
        pipe.fuse_lora()
        self.loaded = True


def load_student_export(export_dir: str | Path) -> StudentExport:
    """The exported scheduler (``scheduler/``) and ``inference.json``'s step count, method and
    ``set_timesteps`` arguments: exactly what a stock pipeline call is given."""
    export_dir = Path(export_dir)
    settings, scheduler_dir = export_dir / "inference.json", export_dir / "scheduler"
    if not settings.is_file() or not (scheduler_dir / "scheduler_config.json").is_file():
        raise ConfigError(f"{export_dir}: no exported student (inference.json, scheduler/); finish `rapm distill` first")
    info = json.loads(settings.read_text(encoding="utf-8"))
    exported = json.loads((scheduler_dir / "scheduler_config.json").read_text(encoding="utf-8"))
    sampler = StockSampler(exported, int(info["num_inference_steps"]), dict(info.get("set_timesteps", {})))
    return StudentExport(export_dir, sampler, info.get("method", "rapm"), dict(info.get("pipeline_call", {})))
