"""``rapm``: one subcommand per stage flow, and the tools around them.

Every stage command runs its Prefect flow: on the Prefect server that ``PREFECT_API_URL`` (or
the active Prefect profile) names, as a flow run with its logs and artifacts in the UI; without
one, the flow's body runs directly in this process, with no server started and nothing left
behind (:func:`flows.common.run_flow`).

The subcommands are listed in :data:`COMMANDS` with their one-line help; only the chosen one's
module is imported and its options built (from its config model), and the engines, torch and
Prefect are imported only when the command runs, so ``rapm --help`` and ``rapm CMD --help``
answer at once. The libraries' own output (warnings, log lines, progress bars) stays off the
terminal (:mod:`flows.library_output`). User errors (bad input, mismatched stores, invalid
options, unwritable paths) print one line and exit 2, without a traceback, also when a flow
raises them. Ctrl-C prints one line saying what was kept and exits 130. The stage engines lock
what they write (a run dir, a store); the stage commands take the same lock first, so a second
command on the same output is refused at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys

from flows import console
from flows.errors import is_user_error, path_error_message
from flows.interrupts import EXIT_INTERRUPTED, where_stopped
from flows.library_output import route_library_output

DESCRIPTION = ("RAPM diffusion distillation as a staged pipeline: ingest prompts, generate teacher trajectories, "
               "distil a few-step student, evaluate it; plus tools to inspect stores and plan runs.")

# name → (one-line help, "module:function" adding the command's options to its parser).
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("turn a prompt file into a prompt store", "flows.stage_commands:ingest"),
    "trajectories": ("Stage A: generate teacher trajectories into a Zarr store", "flows.stage_commands:trajectories"),
    "store": ("inspect or verify a trajectory store, or render one trajectory", "flows.store_cli:configure"),
    "evaluate": ("Stage C: benchmark a distilled run against the teacher", "flows.stage_commands:evaluate"),
    "sample": ("sample a finished run's student (its export) from prompts", "flows.stage_commands:sample"),
    "pipeline": ("ingest → trajectories → distill → evaluate in one work dir", "flows.stage_commands:pipeline"),
    "demo": ("the whole pipeline on the embedded shapes teacher, sized for a CPU", "flows.stage_commands:demo"),
    "demo-flow": ("the same on the embedded rectified-flow (SD3-class) teacher", "flows.stage_commands:demo_flow"),
    "distill": ("Stage B: distil the store's teacher into a few-step LoRA student", "flows.stage_commands:distill"),
    "recipe": ("train and measure the embedded default shapes assets", "flows.recipe:configure"),
    "plan": ("predict each stage's peak GPU memory and time (no weights, no GPU)", "flows.plan:configure"),
    "fid-stats": ("Inception FID reference statistics of a folder of real images", "flows.fid_stats:configure"),
}


def _configure(parser: argparse.ArgumentParser, target: str) -> None:
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """``rapm``'s parser; with ``command``, only that subcommand gets its options (the others
    are listed by name and help), without, every subcommand does."""
    parser = argparse.ArgumentParser(prog="rapm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, target) in COMMANDS.items():
        chosen = sub.add_parser(name, help=text, description=text)
        if command is None or command == name:
            _configure(chosen, target)
    return parser


def _option_name(loc: tuple, flags: dict[str, str]) -> str:
    """The command-line flag of a validation error's field (``distill.training.lr`` → ``--distill-lr``)."""
    names = [str(p) for p in loc if isinstance(p, str)]
    for end in range(len(names), 0, -1):
        if (flag := flags.get(".".join(names[:end]))) is not None:
            return flag
    return "--" + (names[-1] if names else ".".join(map(str, loc))).replace("_", "-")


def _one_line(err: BaseException, flags: dict[str, str]) -> str:
    from pydantic import ValidationError

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
    # Imported here, only for the command that needs it.
    if args.command == "distill":
        from storage.run_dir import RunDir

        return RunDir(args.out).lock()
    if args.command == "trajectories":
        from rapm_core.trajectories.generate import store_lock

        return store_lock(args.out)
    if args.command == "evaluate" and args.feature_store:
        from rapm_core.evaluate.scale import store_lock as feature_store_lock

        return feature_store_lock(args.feature_store)
    return contextlib.nullcontext()


class _Interrupted:
    """Whether Ctrl-C came; the SIGINT handler also silences Prefect's console at once, before
    a flow engine logs its crash report on the way out."""

    def __init__(self) -> None:
        self.came = False

    @contextlib.contextmanager
    def watching(self):
        def interrupted(signum, frame):
            self.came = True
            console.silence()
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


def _stopped(args: argparse.Namespace) -> int:
    # A second Ctrl-C while the command stops ends the process at once, without a traceback;
    # what was kept is on disk already and the lock goes with the process.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    console.silence()
    print(f"rapm {args.command}: {where_stopped(args)}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _chosen(argv: list[str]) -> str:
    """The subcommand ``argv`` names (its first word; options before it are the top parser's)."""
    return argv[0] if argv and argv[0] in COMMANDS else ""


def main(argv: list[str] | None = None) -> int:
    # Before any library is imported: its own handlers and bars are set up at import.
    route_library_output()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_chosen(argv))
    args = parser.parse_args(argv)
    interrupt = _Interrupted()
    try:
        with interrupt.watching(), _command_lock(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _stopped(args)
    except BaseException as err:
        if interrupt.came:  # whatever an interrupted flow engine raised on its way out
            return _stopped(args)
        if not is_user_error(err):
            raise
        console.silence()
        print(f"rapm {args.command}: error: {_one_line(err, _flags(parser, args.command))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
