"""Locations that may be local paths or fsspec URLs (``s3://…``, ``gs://…``, ``memory://…``).

Zarr opens a URL string itself (``FsspecStore``), so the trajectory store needs nothing more
than to keep the string intact: ``Path("s3://b/x")`` would silently become ``s3:/b/x``.
Endpoints and credentials never enter a config, because configs are hashed and copied into
store metadata; the filesystem drivers read them from the environment instead
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` for s3fs, or fsspec's
own ``FSSPEC_S3_ENDPOINT_URL``-style variables for any protocol).

What needs an atomic rename (checkpoints, the run dir's markers) stays on a local filesystem:
object stores have no rename, so a crash mid-copy would leave a half-written checkpoint that
looks whole. ``require_local`` refuses such locations with a message saying what to do instead.
Directories of finished files (an evaluation report) are published to a URL with
``publish_dir``, which uploads the files a reader opens first last, so a partial upload is
recognisable by that file's absence.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
from fsspec.core import split_protocol

from storage.errors import StoreError

_LOCAL_PROTOCOLS = (None, "file", "local")


def is_url(location: str | Path) -> bool:
    """True for a non-local fsspec URL; plain paths and ``file://`` URLs are local."""
    if isinstance(location, Path):
        return False
    protocol, _ = split_protocol(str(location))
    return protocol not in _LOCAL_PROTOCOLS


def require_local(location: str | Path, what: str) -> Path:
    """The local path of ``location``; a clear refusal if it is an object-store URL."""
    if is_url(location):
        raise StoreError(
            f"{location}: {what} must be on a local (or network-mounted) filesystem: it is written "
            f"by atomic renames, which object stores do not have; use a local path and copy the "
            f"finished result to object storage afterwards")
    protocol, path = split_protocol(str(location))
    return Path(path if protocol else location).expanduser()


def join(location: str, *parts: str) -> str:
    """``location/part/…`` for a URL or a local path, without normalising a URL's ``//``."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def exists(location: str) -> bool:
    fs, path = fsspec.core.url_to_fs(str(location))
    return fs.exists(path)


def read_text(location: str) -> str:
    with fsspec.open(str(location), "rt", encoding="utf-8") as f:
        return f.read()


def publish_dir(local_dir: str | Path, location: str, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under ``local_dir`` to ``location`` (any fsspec URL or path); the
    relative names in ``last`` go last, in that order.

    Returns the uploaded locations in upload order. Re-publishing overwrites file by file, so a
    reader that sees the ``last`` files sees a complete copy of some publish.
    """
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise StoreError(f"{local_dir}: nothing to publish")
    rel = [p.relative_to(local_dir).as_posix() for p in files]
    order = sorted(rel, key=lambda r: (r in last, last.index(r) if r in last else 0, r))
    fs, root = fsspec.core.url_to_fs(str(location))
    uploaded = []
    for r in order:
        target = f"{root.rstrip('/')}/{r}"
        fs.makedirs(fs._parent(target), exist_ok=True)
        fs.put_file(str(local_dir / r), target)
        uploaded.append(join(location, r))
    return uploaded


def read_bytes(location: str) -> bytes:
    with fsspec.open(str(location), "rb") as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """A whole file at a path (atomically: temp + rename) or at a URL (one object upload, which
    object stores make visible whole)."""
    if not is_url(location):
        from storage.atomic import write_bytes_atomic

        write_bytes_atomic(require_local(location, "this file"), data)
        return
    with fsspec.open(str(location), "wb") as f:
        f.write(data)
