"""The files of a local teacher directory, checked before diffusers reads them.

Diffusers loads a pipeline whose ``tokenizer/`` folder is gone (the prompt encoder then fails deep
inside with an ``OverflowError``) and reports a missing UNet weights file as a missing ``.bin``.
This names the first missing or unreadable component of a stock diffusers layout in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from rapm_core.errors import ConfigError

# The weight file names stock ``from_pretrained`` looks for, per library (shards by their index).
_WEIGHTS = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                  "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"),
    "transformers": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json"),
}
# A CLIP tokenizer is either the fast tokenizer's one file or the slow one's vocabulary and merges.
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# What RAPM loads (a safety checker is never loaded, a feature extractor never used).
USED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
        "tokenizer_3", "scheduler")


def _json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what}: {path.name} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what}: {path.name} is not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: {path.name} holds a JSON {type(value).__name__}, not an object")
    return value


def model_index(root: Path, source: str) -> dict:
    return _json_object(root / "model_index.json", f"teacher {source!r} is not a diffusers pipeline directory")


def _check_component(root: Path, source: str, name: str, library: str, cls: str) -> bool | None:
    """Raise what is missing; for a component with weights, whether they are safetensors."""
    folder = root / name
    what = f"teacher {source!r}: component {name}/ ({cls})"
    if not folder.is_dir():
        raise ConfigError(f"teacher {source!r}: its {name}/ folder ({cls}, listed in model_index.json) is missing")
    if "Tokenizer" in cls:
        if not any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES):
            raise ConfigError(f"{what} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
        for path in sorted(folder.glob("*.json")):
            _json_object(path, what)
        return None
    if "Scheduler" in cls:
        _json_object(folder / "scheduler_config.json", what)
        return None
    if library in _WEIGHTS:
        _json_object(folder / "config.json", what)
        if not any((folder / f).is_file() for f in _WEIGHTS[library]):
            raise ConfigError(f"{what} has no weights ({' or '.join(_WEIGHTS[library][:2])})")
        return any(f.endswith((".safetensors", ".safetensors.index.json")) and (folder / f).is_file()
                   for f in _WEIGHTS[library])
    return None


def check_teacher_dir(root: Path, source: str, components: tuple[str, ...] | None = None) -> bool:
    """Check the components a load reads (all that model_index.json lists, or ``components``);
    say whether all their weights are safetensors (so the load can insist on them, and never
    falls back to unpickling a ``.bin``)."""
    index = model_index(root, source)
    listed = {name: entry for name, entry in index.items()
              if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0]}
    safetensors = []
    for name in components or tuple(n for n in listed if n in USED):
        library, cls = listed.get(name, ("diffusers", name))
        safetensors.append(_check_component(root, source, name, library, cls))
    return all(s is not False for s in safetensors)
