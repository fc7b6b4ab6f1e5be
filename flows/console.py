"""What Prefect prints on the terminal of a ``rapm`` command, beyond the command's own lines.

A flow run logs an exception it ends with to its console handler, traceback included, then
"Finished in state Failed(...)"; for a user error (a bad store, an unwritable path) the CLI
prints the one line that says what to fix, and the rest is noise. After Ctrl-C the engine logs
its crash report and Prefect its shutdown while the command is stopping, again around the one
line the CLI prints (and "Stopping temporary server" would follow an error line, so it would no
longer be the last). :class:`QuietConsole` drops exactly those records from the *console*
handler; Prefect's API handler is a separate handler on the same loggers, so the flow run's own
log in the Prefect UI keeps the traceback.
"""

from __future__ import annotations

import logging

from flows.errors import is_user_error


class QuietConsole(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False  # set by the CLI's SIGINT handler
        self.finished = False  # set once the CLI printed its error line
        self._failed_runs: set = set()  # flow/task runs that ended with a user error

    def filter(self, record: logging.LogRecord) -> bool:
        if self.interrupted or self.finished:
            # The command has said its last word; what follows is shutdown noise (the crash
            # report, "Stopping temporary server", Prefect's "EventsWorker - Still processing").
            return False
        run = getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_user_error(error):
            if run is not None:
                self._failed_runs.add(run)  # its "Finished in state Failed(...)" follows
            return False
        return run is None or run not in self._failed_runs


def quiet_prefect_console() -> QuietConsole:
    """Attach one fresh :class:`QuietConsole` to every Prefect console handler of this process
    (replacing one an earlier in-process command left there)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = QuietConsole()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    handlers = {id(h): h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}
    for handler in handlers.values():
        for old in [f for f in handler.filters if isinstance(f, QuietConsole)]:
            handler.removeFilter(old)
        handler.addFilter(quiet)
    return quiet
