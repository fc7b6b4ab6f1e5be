"""What Prefect prints on the terminal of a ``rapm`` command that runs its flow on a Prefect
server (``PREFECT_API_URL`` set), beyond the command's own lines.

A flow run logs an exception it ends with to its console handler, traceback included, then
"Finished in state Failed(...)"; for a user error (a bad store, an unwritable path) the CLI
prints the one line that says what to fix, and the rest is noise. After Ctrl-C the engine logs
its crash report while the command is stopping, around the one line the CLI prints.
:class:`QuietConsole` drops exactly those records from the *console* handler; Prefect's API
handler is a separate handler on the same loggers, so the flow run's own log in the Prefect UI
keeps the traceback. Without a server no Prefect engine runs and none of this applies.
"""

from __future__ import annotations

import logging

from flows.errors import is_user_error


class QuietConsole(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.silenced = False  # set once the command says its last line (an error, an interrupt)
        self._failed_runs: set = set()  # flow/task runs that ended with a user error

    def filter(self, record: logging.LogRecord) -> bool:
        if self.silenced:
            return False  # what follows is the engine's crash report and shutdown noise
        run = getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_user_error(error):
            if run is not None:
                self._failed_runs.add(run)  # its "Finished in state Failed(...)" follows
            return False
        return run is None or run not in self._failed_runs


_current: QuietConsole | None = None


def attach_quiet_console() -> QuietConsole:
    """Attach one fresh :class:`QuietConsole` to every Prefect console handler of this process
    (replacing one an earlier in-process command left there)."""
    global _current
    from prefect.logging.handlers import PrefectConsoleHandler

    _current = QuietConsole()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    handlers = {id(h): h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}
    for handler in handlers.values():
        for old in [f for f in handler.filters if isinstance(f, QuietConsole)]:
            handler.removeFilter(old)
        handler.addFilter(_current)
    return _current


def silence() -> None:
    """The command has said (or is about to say) its last line: Prefect's console stays quiet."""
    if _current is not None:
        _current.silenced = True

