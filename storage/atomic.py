"""Durable writes: temp file or directory + fsync + rename, so a kill -9 leaves either the old
state or the new one, never a torn file. Every store in this package writes through here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(directory: Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp``, but with the mode ``open()`` would give (0666 less the umask): mkstemp's
    0600 would otherwise stay on the renamed file, hiding a shared store from its group."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def temp_directory(directory: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` with the mode ``mkdir`` would give (0777 less the umask), not 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def check_writable(directory: str | Path) -> None:
    """Raise the OSError (naming ``directory``) that writing into it would raise, before any work
    that would be lost: a read-only mount or an unwritable directory."""
    directory = Path(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-probe-", dir=directory)
    except OSError as err:
        raise type(err)(err.errno, err.strerror, str(directory)) from err
    os.close(fd)
    os.unlink(tmp)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success fsync it and rename it into place.

    On any exception (or a kill) the temp directory is left with a ``.tmp-`` prefix, which
    readers ignore and :func:`remove_stale_temps` clears. ``final`` must not exist yet.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_directory(final.parent, prefix=f".tmp-{final.name}-")
    try:
        yield tmp
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete ``.tmp-*`` leftovers of interrupted atomic writes; return what was removed."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
