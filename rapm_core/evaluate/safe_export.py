"""A ``--fid-weights .pt2`` (a ``torch.export.save`` archive) loaded without running its pickles.

``torch.export.load`` unpickles parts of the archive with ``weights_only=False`` (its sample
inputs after a failed safe load, pickled weights and constants, custom objects), so a crafted
file runs code while it loads. Here every tensor in it goes through torch's ``weights_only``
unpickler (plain tensors and containers, nothing callable), an archive holding pickled Python
objects is refused before anything is read, and the graph itself is torch's JSON of torch
operators. A network exported for one batch size is run in chunks of that size.
"""

from __future__ import annotations

import functools
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.export.pt2_archive import constants as _pt2

from rapm_core.errors import ConfigError

# Opaque objects are a newer archive entry (torch 2.13); on an older torch none can be present.
PICKLED_OBJECT_PREFIXES = tuple(p for p in (_pt2.CUSTOM_OBJ_FILENAME_PREFIX,
                                            getattr(_pt2, "OPAQUE_OBJ_FILENAME_PREFIX", None)) if p)


def _refuse_pickled_objects(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"{path}: not a torch.export feature network ({err})") from None
    objects = [n for n in names if Path(n).name.startswith(PICKLED_OBJECT_PREFIXES)]
    if objects:
        raise ConfigError(f"{path}: holds pickled Python objects ({objects[0]}), which rapm does not load (they can run "
                          f"code); export a network of tensors only")


@contextmanager
def _tensors_only() -> Iterator[None]:
    # torch.export.load calls torch.load(..., weights_only=False) from inside torch: while it
    # runs, every torch.load is the weights_only one, whatever its caller asks.
    unsafe = torch.load

    @functools.wraps(unsafe)
    def weights_only(*args, **kwargs):
        kwargs["weights_only"] = True
        return unsafe(*args, **kwargs)

    torch.load = weights_only
    try:
        yield
    finally:
        torch.load = unsafe


def _static_batch(program: torch.export.ExportedProgram) -> int | None:
    """The batch size a program was exported for, or None if its batch dimension is dynamic."""
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    value = inputs[0].meta.get("val") if inputs else None
    if value is None or value.dim() == 0:
        return None
    batch = value.shape[0]
    return int(batch) if isinstance(batch, int) else None


class FixedBatch(nn.Module):
    """A network that takes exactly ``batch`` images, run on any number of them: chunks of
    ``batch``, the last one filled up with copies of its last image (per-image features, so the
    copies change nothing) and their features dropped."""

    def __init__(self, net: nn.Module, batch: int):
        super().__init__()
        self.net, self.batch = net, batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for a in range(0, images.shape[0], self.batch):
            chunk = images[a:a + self.batch]
            fill = self.batch - chunk.shape[0]
            if fill:
                chunk = torch.cat([chunk, chunk[-1:].expand(fill, *chunk.shape[1:])])
            out.append(self.net(chunk)[:self.batch - fill])
        return torch.cat(out)


def load_exported_network(path: Path) -> nn.Module:
    _refuse_pickled_objects(path)
    try:
        with _tensors_only():
            program = torch.export.load(str(path))
        net = program.module()
    except Exception as err:  # a damaged, foreign or unsafe file: say which, in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{path}: not a torch.export feature network of tensors only ({first})") from err
    batch = _static_batch(program)
    return net if batch is None else FixedBatch(net, batch)
