"""Where the libraries' own output goes while a ``rapm`` command runs: off its terminal.

A stage's terminal shows its own progress and results. Left alone, the libraries under it add
theirs: transformers, diffusers and huggingface_hub print through stderr handlers of their own
("No LoRA keys associated to CLIPTextModel…", "`CLIPImageProcessor` requires torchvision…"),
peft, torch and torchmetrics warn through :mod:`warnings`, every model load draws tqdm bars.
:func:`route_library_output` sends all of it elsewhere for the rest of the process:

- tqdm bars are off (``TQDM_DISABLE``, inherited by Dask worker processes too);
- a library's log record (a warning included, through ``py.warnings``) goes to the flow run's
  log when the command runs as a flow run on a Prefect server (Prefect's API handler only: the UI
  shows it, the terminal does not), and nowhere outside a run — there nothing is recorded (no
  file is written beside a run or a store, which may be an ``s3://`` URL);
- one that reports an error (``ERROR`` and above) matters to the user: it is one line of ours,
  ``<library>: <its first line>``, on the terminal (and in the run's log);
- Dask's ``distributed`` logs from ``warning`` up (its ``info`` is a cluster's every start and
  stop), routed the same way; the worker processes of a local cluster, whose stderr is the
  command's terminal too, route theirs from their start (:func:`dask_setup`).

``RAPM_LIBRARY_OUTPUT=show`` leaves the libraries printing as they do by default, for debugging.
"""

from __future__ import annotations

import logging
import os
import sys

SHOW = ("RAPM_LIBRARY_OUTPUT", "show")

# The top loggers of the libraries a stage runs; their children (``diffusers.loaders.peft`` …)
# propagate to them. Ours are ``rapm`` and ``prefect.*`` (the run's own lines).
LIBRARY_LOGGERS = ("py.warnings", "transformers", "diffusers", "huggingface_hub", "peft", "torch",
                   "torchmetrics", "accelerate", "safetensors", "PIL", "fsspec", "zarr", "numcodecs",
                   "distributed")

# Read at import by the libraries (and by the Dask worker processes this one starts).
ENVIRONMENT = {"TQDM_DISABLE": "1", "DASK_LOGGING__DISTRIBUTED": "warning"}


def _in_run() -> bool:
    if "prefect.context" not in sys.modules:  # Prefect not even imported: no run
        return False
    from flows.common import in_run

    return in_run()


def one_line(record: logging.LogRecord) -> str:
    """``<library>: <first line of the message>``, what the terminal shows of a library's error."""
    lines = record.getMessage().strip().splitlines() or [""]
    return f"{record.name.split('.')[0]}: {lines[0]}"


class LibraryRecords(logging.Handler):
    """The one handler of every library logger: to the run's log inside a flow run, nowhere
    outside one; an error is also one line of ours on the terminal."""

    def __init__(self) -> None:
        super().__init__()
        self._api = None

    def _run_log(self) -> logging.Handler:
        if self._api is None:
            from prefect.logging.handlers import APILogHandler

            self._api = APILogHandler()
            self._api.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        return self._api

    def emit(self, record: logging.LogRecord) -> None:
        try:
            in_run = _in_run()
            if in_run:
                self._run_log().handle(record)
            if record.levelno >= logging.ERROR:
                from flows.common import run_logger

                # In a run this line reaches the run's log too: only the console needs it from here.
                run_logger().log(record.levelno, one_line(record), extra={"send_to_api": not in_run})
        except Exception:  # noqa: BLE001 - a log record must never break the stage
            self.handleError(record)


class _LibraryLogger(logging.Logger):
    """A library's top logger that keeps only :class:`LibraryRecords`: transformers, diffusers
    and huggingface_hub attach a stderr handler of their own when first imported or used, and
    importing them up front to take it off again costs seconds that ``rapm --help`` must not."""

    # Never on to the root logger either: its handler is Prefect's console, the terminal.
    propagate = property(lambda self: False, lambda self, value: None)

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        if isinstance(hdlr, LibraryRecords):
            super().addHandler(hdlr)


_records: LibraryRecords | None = None


def route_library_output() -> None:
    """Route the libraries' output as the module says, for the rest of this process (idempotent)."""
    global _records
    if os.environ.get(SHOW[0]) == SHOW[1] or _records is not None:
        return
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    _records = LibraryRecords()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.__class__ = _LibraryLogger  # also a logger created before (an embedding caller's)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_records)
    logging.captureWarnings(True)  # warnings become records of py.warnings


def dask_setup(worker) -> None:
    """Dask's preload hook (``preload=["flows.library_output"]``): a worker process routes too."""
    route_library_output()
