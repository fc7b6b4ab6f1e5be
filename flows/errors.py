"""The exception types that mean "the user must fix something", gathered from both layers so the
CLI and the flows can report them in one line instead of a traceback."""

from __future__ import annotations

import errno
from pathlib import Path

from pydantic import ValidationError

from rapm_core.errors import ConfigError
from storage.errors import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StoreError, FileNotFoundError)
"""Errors about stores and input files that the user can fix; the message names the file and the problem."""

# A path the user gave that this process may not write (or read): a read-only directory or
# filesystem. Only with a file name: without one it is not about a path the user chose.
_PATH_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system"}


def _user_path(filename: str) -> str:
    # Stores are written into a temp name beside their final path first (storage.atomic:
    # ``.tmp-NAME-…`` dirs, ``.NAME.….tmp`` files); the directory the user chose is the one to name.
    path = Path(filename)
    return str(path.parent) if path.name.startswith(".tmp-") or path.name.endswith(".tmp") else filename


def path_error_message(err: BaseException) -> str | None:
    """``PATH: permission denied; …`` for an OSError about a path the user can fix, else None."""
    if not isinstance(err, OSError) or err.errno not in _PATH_ERRNOS or not err.filename:
        return None
    return f"{_user_path(str(err.filename))}: {_PATH_ERRNOS[err.errno]}; choose another path or make it writable"


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is reported as one line (exit 2) rather than a traceback."""
    return isinstance(err, (ValidationError, *USER_ERRORS)) or path_error_message(err) is not None
