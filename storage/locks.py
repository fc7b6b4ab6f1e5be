"""One writer per directory, across processes: an advisory lock file in or beside the directory.

Built on ``filelock``'s native lock (``flock``): the kernel drops the lock when the process that
holds it dies, however it dies (kill -9 included), so a lock left behind by a killed run is
simply free again and the next process takes it over; nothing here probes PIDs to decide.
The holder writes its PID, host and start time into the lock file only so that a refused
process can say who is in the way.

The lock is per process and reentrant: every ``DirLock`` on the same directory in one process
shares one underlying lock (``is_singleton``) and its hold is shared by all threads, so a CLI
that locks a run dir and the run loop it calls, which locks it again, do not refuse each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from storage.errors import StoreError

LOCK_NAME = ".rapm-lock"
"""The lock file's name inside the locked directory (not ``.tmp-*``: stale-temp cleanup keeps it)."""


class LockedError(StoreError):
    """Another live process holds the directory's lock."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the process that took it (informative only)."""

    pid: int | None
    host: str | None
    since: float | None
    command: str | None

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            info = json.loads(data.decode("utf-8"))
            return cls(info.get("pid"), info.get("host"), info.get("since"), info.get("command"))
        except (ValueError, AttributeError):
            return None

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        if self.host and self.host != socket.gethostname():
            who += f" on {self.host}"
        if self.since:
            who += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"
        return who


# What a hold of this process created (the locked directory, the lock file), by lock file path, so
# that the release of a hold that wrote nothing leaves no trace (a refused command, for one).
_CREATED: dict[Path, tuple[bool, bool]] = {}

# What each lock file held when this process last took it physically, by inode: the
# ``on_acquired`` hook must be one function for all instances (filelock's singleton compares it).
_PREVIOUS: dict[tuple[int, int], Holder | None] = {}


def _record_holder(fd: int) -> None:
    # Called with the flock held, before anyone else can read: whatever is still in the file was
    # written by a holder that is gone without releasing (a clean release empties the file first).
    st = os.fstat(fd)
    _PREVIOUS[(st.st_dev, st.st_ino)] = Holder.parse(os.pread(fd, 4096, 0))
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_record(), 0)


def _holder_record() -> bytes:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else None
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                       "command": command}).encode("utf-8")


class DirLock:
    """Exclusive lock on ``directory`` for this process; ``with DirLock(d):`` or acquire/release.

    ``acquire`` never waits: a directory held by another live process raises :class:`LockedError`
    at once, naming the holder. When the lock file still names a process that no longer holds
    it (killed), the lock is taken over and that process is kept in ``taken_over``.
    """

    def __init__(self, directory: str | Path, what: str = "directory", lock_file: str | Path | None = None):
        self.directory = Path(directory)
        self.path = Path(lock_file) if lock_file is not None else self.directory / LOCK_NAME
        self.what = what
        self.taken_over: Holder | None = None
        self._lock: FileLock | None = None

    @classmethod
    def beside(cls, directory: str | Path, what: str = "directory") -> "DirLock":
        """The lock on ``directory`` kept in a hidden sibling file, for directories whose every
        entry is read as data (a Zarr group warns about a foreign file inside it), and usable
        before the directory exists."""
        directory = Path(directory)
        return cls(directory, what, directory.parent / f".{directory.name}{LOCK_NAME}")

    def _file_lock(self) -> FileLock:
        if self._lock is None:
            # Same options every time: filelock only shares a singleton among compatible instances.
            self._lock = FileLock(self.path, timeout=0, thread_local=False, is_singleton=True,
                                  on_acquired=_record_holder)
        return self._lock

    def holder(self) -> Holder | None:
        """Who the lock file names (a live holder, or one that died without releasing)."""
        try:
            return Holder.parse(self.path.read_bytes())
        except OSError:
            return None

    def acquire(self) -> "DirLock":
        first = not self._file_lock().is_locked
        created_dir = first and not self.path.parent.exists()
        created_file = first and not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file_lock().acquire()
        except Timeout:  # (an OSError too, so first)
            holder = self.holder()
            raise LockedError(
                f"{self.directory}: {self.what} is in use by another rapm process "
                f"({holder.describe() if holder else 'pid unknown'}); wait for it to finish or stop it") from None
        except OSError as err:
            if err.filename is not None and Path(err.filename) == self.path:
                # Name what the user chose (an unwritable --out), not the lock file inside or beside it.
                raise type(err)(err.errno, err.strerror, str(self.directory)) from err
            raise
        if first:
            _CREATED[self.path] = (created_dir, created_file)
        st = os.stat(self.path)
        previous = _PREVIOUS.pop((st.st_dev, st.st_ino), None)  # None when this was a reentrant hold
        if previous is not None and previous.pid is not None:
            self.taken_over = previous
        return self

    def release(self) -> None:
        lock = self._file_lock()
        if not lock.is_locked:
            return
        if lock.lock_counter == 1:
            # Empty the record while still holding the lock, so the next holder does not take a
            # clean release for a killed one.
            os.truncate(self.path, 0)
            self._remove_if_unused()
        lock.release()

    def _remove_if_unused(self) -> None:
        """Before the last release: if this hold created the lock file and nothing was written
        into the directory, remove the lock file (and the directory, if this hold made it).
        Unlinking a held lock file is safe: filelock re-checks the inode after its flock."""
        created_dir, created_file = _CREATED.pop(self.path, (False, False))
        inside = self.path.parent == self.directory
        others = ([p for p in self.directory.iterdir() if p != self.path] if self.directory.is_dir()
                  else [])
        if not created_file or others or (not inside and self.directory.exists()):
            return
        self.path.unlink(missing_ok=True)
        if created_dir:
            with contextlib.suppress(OSError):  # not empty after all: someone else wrote there
                self.path.parent.rmdir()

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
