"""The distilled student as its export describes it: read the way a user of the LoRA reads it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rapm_core.errors import ConfigError
from rapm_core.schedule import inference_scheduler


@dataclass
class StudentExport:
    directory: Path
    scheduler_config: dict
    num_steps: int
    method: str
    solver: str = "ddim"  # how its exported scheduler samples: "ddim" or "lcm"
    loaded: bool = field(default=False, compare=False)

    def load_into(self, pipe) -> None:
        """Load the LoRA into ``pipe`` with stock diffusers and fuse it, as it would be deployed."""
        pipe.load_lora_weights(str(self.directory))
        pipe.fuse_lora()
        self.loaded = True


def load_student_export(export_dir: str | Path) -> StudentExport:
    """The exported scheduler config, step count and method (``inference.json``)."""
    export_dir = Path(export_dir)
    settings, scheduler_dir = export_dir / "inference.json", export_dir / "scheduler"
    if not settings.is_file() or not (scheduler_dir / "scheduler_config.json").is_file():
        raise ConfigError(f"{export_dir}: no exported student (inference.json, scheduler/); finish `rapm distill` first")
    info = json.loads(settings.read_text(encoding="utf-8"))
    exported = json.loads((scheduler_dir / "scheduler_config.json").read_text(encoding="utf-8"))
    if exported.get("_class_name") == "LCMScheduler":
        return StudentExport(export_dir, exported, int(info["num_inference_steps"]), info.get("method", "lcm"), "lcm")
    config = dict(inference_scheduler(exported).config)
    return StudentExport(export_dir, config, int(info["num_inference_steps"]), info.get("method", "rapm"))
