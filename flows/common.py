"""What every stage flow does alike, with a Prefect server or without one.

A stage is a Prefect flow run when a Prefect API is configured (``PREFECT_API_URL``, or the
active profile, names a server: ``make up``, a deployment's worker): the run, its logs and its
artifacts are then in that server's UI. Without one, ``rapm`` runs the same flow body directly
in its own process (:func:`run_flow`): no temporary server to start, wait for or leave behind.
The helpers here make a flow body work both ways: its log lines go to the run's log or to
stderr (:func:`run_logger`), artifacts are published inside a run and skipped outside one, where
there is no server to keep them (:func:`publish`, :class:`ProgressArtifact`), and tasks run as
task runs or as plain calls (:func:`run_task`).
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.settings import get_current_settings

from rapm_core.progress import Progress


def api_configured() -> bool:
    """Whether a Prefect server is configured for this process (environment or profile)."""
    return bool(get_current_settings().api.url)


def in_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


# What a command found before its flow started, for that flow's body (see ``run_flow``).
_FOUND_BEFORE: ContextVar[tuple[Any, tuple, Any] | None] = ContextVar("rapm_found_before", default=None)


def run_flow(flow, *args: Any, found: Any = None) -> Any:
    """``flow(*args)`` as a Prefect flow run when a server is configured (or as a subflow inside a
    run); otherwise the flow's body, called directly in this process.

    ``found``: what the command's checks already opened (a store, say), handed to the flow body in
    this process (read there with :func:`found_before`) rather than as a flow parameter, which
    Prefect would serialise into its database."""
    token = _FOUND_BEFORE.set((flow, args, found))
    try:
        if in_run() or api_configured():
            from flows.console import attach_quiet_console

            if not in_run():
                attach_quiet_console()
            return flow(*args)
        return flow.fn(*args)
    finally:
        _FOUND_BEFORE.reset(token)


def found_before(flow, *args: Any) -> Any:
    """What ``run_flow(flow, *args, found=…)`` was handed for these very arguments; None otherwise
    (another flow, other arguments, or a call that did not come through ``run_flow``)."""
    handed = _FOUND_BEFORE.get()
    return handed[2] if handed is not None and handed[0] is flow and handed[1] == args else None


def run_task(task, **params: Any) -> Any:
    """A task run inside a flow run; the task's body, called directly, outside one."""
    return task(**params) if in_run() else task.fn(**params)


_STDERR_FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _stderr_logger() -> logging.Logger:
    logger = logging.getLogger("rapm")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_STDERR_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger inside a run; outside one, a logger that writes to stderr in
    the same format as Prefect's console."""
    return get_run_logger() if in_run() else _stderr_logger()


def publish(create: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``create(*args, **kwargs)`` (a ``prefect.artifacts.create_*_artifact``) inside a run;
    nothing outside one, where no server would keep the artifact."""
    return create(*args, **kwargs) if in_run() else None


class ProgressArtifact:
    """A Prefect progress artifact updated at most once per percent (large stages have many
    steps), its description carrying the rate and ETA the logs show. Outside a run only ``log``
    sees the progress."""

    def __init__(self, description: str, log: Callable[[str], None] | None = None):
        self.description, self.log = description, log
        self.id = publish(create_progress_artifact, 0.0, description=description)
        self._shown, self._last = -1, ""

    def __call__(self, p: Progress) -> None:
        percent = int(p.percent)
        if percent == self._shown:
            return
        self._shown, self._last = percent, p.line()
        if self.id is not None:
            update_progress_artifact(self.id, float(percent), description=f"{self.description}: {self._last}")
        if self.log is not None:
            self.log(p.line())

    def finish(self) -> None:
        if self.id is not None:
            last = f" ({self._last})" if self._last else ""
            update_progress_artifact(self.id, 100.0, description=f"{self.description}: done{last}")
