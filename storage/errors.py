"""Errors about stores and input files that the user can fix; the message names the file and the problem."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class StoreError(ValueError):
    """A store or source file is missing, malformed, or was made with a different config."""


class SourceError(StoreError):
    """A prompt source file cannot be read; ``str()`` is ``path:line: problem``."""

    def __init__(self, path, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


class ConfigMismatchError(StoreError):
    """A store or run dir exists but was made with a different config; it is never appended to."""


class DiskFullError(StoreError):
    """A write ran out of space; what was written before (earlier checkpoints) is intact."""


# safetensors reports a full disk as its own exception type, with the OS error only in the message.
_FULL_DISK_TEXT = ("No space left on device", "Disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(err).__name__ == "SafetensorError" and any(t in str(err) for t in _FULL_DISK_TEXT)


@contextmanager
def reporting_full_disk(directory: str | Path, remedy: str) -> Iterator[None]:
    """Turn a full disk under ``directory`` into one :class:`DiskFullError` line naming it and ``remedy``."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(f"{directory}: no space left on device; {remedy}") from err
