"""``rapm``: one subcommand per flow. Every run is a Prefect flow run (visible in the UI when
``PREFECT_API_URL`` points at a server, ephemeral otherwise).

Each subcommand lives beside its flow in a module exposing ``register(subparsers)``; the
function it sets as ``func`` returns the process exit code. User errors (bad input, mismatched
stores, invalid options, unwritable paths) print one line and exit 2, without a traceback, also
when a flow raises them. Ctrl-C prints one line saying what was kept and exits 130. The
temporary Prefect server, when one is needed, lives and dies with this process
(:mod:`flows.prefect_server`). The stage engines lock what they write (a run dir, a store); the
stage commands take the same lock before any Prefect start-up, so a second command on the same
output is refused at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

from pydantic import ValidationError

from flows import prefect_server
from flows.console import QuietConsole, quiet_prefect_console
from flows.errors import is_user_error, path_error_message
from flows.interrupts import EXIT_INTERRUPTED, where_stopped

COMMAND_MODULES = [
    "flows.ingest",
    "flows.trajectories",
    "flows.store_cli",
    "flows.evaluate",
    "flows.sample",
    "flows.pipeline",
    "flows.distill",
    "flows.recipe",
    "flows.plan",
    "flows.fid_stats",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _option_name(loc: tuple, flags: dict[str, str]) -> str:
    """The command-line flag of a validation error's field (``distill.training.lr`` → ``--distill-lr``)."""
    names = [str(p) for p in loc if isinstance(p, str)]
    for end in range(len(names), 0, -1):
        if (flag := flags.get(".".join(names[:end]))) is not None:
            return flag
    return "--" + (names[-1] if names else ".".join(map(str, loc))).replace("_", "-")


def _one_line(err: BaseException, flags: dict[str, str]) -> str:
    if (path_message := path_error_message(err)) is not None:
        return path_message
    if isinstance(err, ValidationError):
        parts = [f"{_option_name(e['loc'], flags)}: {e['msg']}" for e in err.errors()]
        return "invalid options: " + "; ".join(parts)
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """dest → flag of the options of ``command``'s subparser."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    chosen = sub.choices.get(command)
    if chosen is None:
        return {}
    return {a.dest: a.option_strings[-1] for a in chosen._actions if a.option_strings}


def _command_lock(args: argparse.Namespace):
    """The one-writer lock of what ``args.command`` writes (the engine takes it again, reentrantly)."""
    # Imported here, after main() has quietened transformers, and only for the command that needs it.
    from rapm_core.evaluate.scale import store_lock as feature_store_lock
    from rapm_core.trajectories.generate import store_lock
    from storage.run_dir import RunDir

    if args.command == "distill":
        return RunDir(args.out).lock()
    if args.command == "trajectories":
        return store_lock(args.out)
    if args.command == "evaluate" and args.feature_store:
        return feature_store_lock(args.feature_store)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _sigint_marks(console: QuietConsole):
    """Ctrl-C raises KeyboardInterrupt as usual, after telling the console filter to go quiet."""
    def interrupted(signum, frame):
        console.interrupted = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread (an embedding caller): keep its handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stopped(args: argparse.Namespace, console: QuietConsole) -> int:
    # A second Ctrl-C while Prefect shuts down ends the process at once, without a traceback;
    # what was kept is on disk already and the lock and server go with the process.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    console.interrupted = True
    print(f"rapm {args.command}: {where_stopped(args)}", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    # A cold ephemeral Prefect server on 2 cores needs more than the 20 s default, and its
    # telemetry call fails offline with a noisy error line.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # transformers warns at import that torchvision is missing; the PIL image processors it
    # falls back to are never used here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    console = quiet_prefect_console()
    prefect_server.install()
    try:
        with _sigint_marks(console), _command_lock(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _stopped(args, console)
    except BaseException as err:
        if console.interrupted:  # whatever the interrupted flow engine raised on its way out
            return _stopped(args, console)
        if not is_user_error(err):
            raise
        console.finished = True
        print(f"rapm {args.command}: error: {_one_line(err, _flags(parser, args.command))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
