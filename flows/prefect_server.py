"""The temporary Prefect server of one ``rapm`` command, tied to that command's life.

Without ``PREFECT_API_URL``, Prefect 3.9 starts an ephemeral API on the first client call:
``SubprocessASGIServer`` runs ``python -m uvicorn … prefect.server.api.server:create_app`` as a
plain child, in the command's own process group. So a terminal's Ctrl-C reaches the server as
well, it dies, and the interrupted flow engine then retries the dead API for minutes before
exiting with screens of tracebacks; and a ``kill -9`` of the command leaves the server (~220 MB)
running, re-parented to init.

:func:`install` keeps Prefect's own lazy start, port choice, health wait and start-up timeout,
and changes only how the child is made (:class:`CommandServer`):

- it runs in its own session, so signals meant for the command's terminal do not reach it;
- its stdin is the read end of a pipe whose write end only this process holds (close-on-exec);
  when this process ends, however it ends (kill -9 included), the kernel closes that end, the
  server reads EOF and shuts itself down (:func:`serve`). ``prctl(PR_SET_PDEATHSIG)`` would not
  do: it fires when the *thread* that forked exits, and Prefect may start the server from one of
  its worker threads.

The subclass is registered the way ``prefect.testing.utilities.prefect_test_harness`` registers
its server (as ``SubprocessASGIServer._instances[None]``, the instance Prefect's clients use),
when ``prefect.server.api.server`` is first imported: importing it costs ~2 s, which a command
that ends before any flow runs (a finished stage, a bad option) should not pay.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

SERVER_MODULE = "prefect.server.api.server"
SHUTDOWN_GRACE_S = 10.0  # uvicorn's graceful stop, then a hard exit
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after one module's code has run (a one-shot post-import hook)."""

    def __init__(self, name: str, callback: Callable[[Any], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            exec_module, callback = spec.loader.exec_module, self.callback

            def exec_then_call(module):
                exec_module(module)
                callback(module)

            spec.loader.exec_module = exec_then_call
        return spec


def _when_imported(name: str, callback: Callable[[Any], None]) -> None:
    """Call ``callback(module)`` once ``name`` has been imported (at once if it already is)."""
    if name in sys.modules:
        callback(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _make_server_class(base: type) -> type:
    class CommandServer(base):
        """Prefect's ephemeral server, started in its own session on a lifeline (see module doc)."""

        _lifeline: int | None = None

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect
            from prefect.settings import get_current_settings

            self._close_lifeline()  # a retry after "port in use" (exit 3) gets a fresh pipe
            read_end, self._lifeline = os.pipe()
            # The same command and environment as SubprocessASGIServer._run_uvicorn_command.
            uvicorn_args = ["--app-dir", str(prefect.__module_path__.parent),
                            "--factory", f"{SERVER_MODULE}:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                            "--log-level", "error", "--lifespan", "on"]
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
            try:
                return subprocess.Popen([sys.executable, "-m", __name__, *uvicorn_args], env=env, stdin=read_end,
                                        start_new_session=True)
            finally:
                os.close(read_end)

        def _close_lifeline(self) -> None:
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None

        def stop(self) -> None:
            try:
                super().stop()
            finally:
                self._close_lifeline()

    return CommandServer


def _register(module) -> None:
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return  # the user's own server (set after import, e.g. by a profile switch)
    if None in module.SubprocessASGIServer._instances:
        return  # someone else's server is the default already (e.g. prefect_test_harness)
    _make_server_class(module.SubprocessASGIServer)()  # registers itself under port None


def install() -> bool:
    """Make this command's ephemeral Prefect server (if it needs one) a :class:`CommandServer`.

    Does nothing and returns False when ``PREFECT_API_URL`` names a server (the user's own,
    which a command must neither start nor stop).
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return False
    _when_imported(SERVER_MODULE, _register)
    return True


# -- the server process --------------------------------------------------------------------------
def _watch_lifeline() -> None:
    try:
        while os.read(0, 4096):  # nobody writes; EOF means the command's process is gone
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(SHUTDOWN_GRACE_S)
    os._exit(1)


def serve(uvicorn_args: list[str]) -> None:
    """Run uvicorn with ``uvicorn_args``, shutting down once stdin (the lifeline) reaches EOF."""
    threading.Thread(target=_watch_lifeline, name="lifeline", daemon=True).start()
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(args=uvicorn_args, prog_name="uvicorn")


if __name__ == "__main__":
    serve(sys.argv[1:])
