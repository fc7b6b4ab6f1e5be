"""Writes trajectory batches on a background thread, so compression and disk I/O overlap generation."""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from storage.errors import StoreError

if TYPE_CHECKING:
    from storage.trajectory_store import TrajectoryStore


class TrajectoryWriter:
    """Writes batches on a background thread so compression and disk I/O overlap generation.

    The bounded queue caps the memory held by batches not yet written. Leaving the ``with`` block
    (also through an exception) writes everything already submitted before returning; a failed
    write is raised in the producer at its next ``submit`` or at exit.
    """

    def __init__(self, store: TrajectoryStore, max_pending: int = 2):
        self._store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.write_seconds = 0.0  # time the writer thread spent writing
        self.wait_seconds = 0.0  # time the producer was blocked on a full queue
        self._thread = threading.Thread(target=self._run, name="trajectory-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            start, arrays = item
            t0 = time.perf_counter()
            try:
                self._store.write_batch(start, arrays)
            except BaseException as err:  # surfaced to the producer
                self._error = err
            self.write_seconds += time.perf_counter() - t0

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StoreError(f"{self._store.path}: writing trajectories failed: {self._error}") from self._error

    def submit(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        self._raise_error()
        t0 = time.perf_counter()
        self._queue.put((start, arrays))
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except StoreError:
                pass  # the original exception is the one to report
