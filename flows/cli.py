"""``rapm``: one subcommand per flow. Every run is a Prefect flow run (visible in the UI when
``PREFECT_API_URL`` points at a server, ephemeral otherwise).

Each subcommand lives beside its flow in a module exposing ``register(subparsers)``; the
function it sets as ``func`` returns the process exit code. User errors (bad input, mismatched
stores, invalid options) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pydantic import ValidationError

from flows.errors import USER_ERRORS

COMMAND_MODULES = [
    "flows.ingest",
    "flows.trajectories",
    "flows.store_cli",
    "flows.evaluate",
    "flows.pipeline",
    "flows.distill",
    "flows.recipe",
    "flows.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _option_name(loc: tuple) -> str:
    names = [str(p) for p in loc if isinstance(p, str)]
    return (names[-1] if names else ".".join(map(str, loc))).replace("_", "-")


def _one_line(err: Exception) -> str:
    if isinstance(err, ValidationError):
        # Nested configs are flattened into top-level options, so name the option by its last
        # field name (``method.rank`` is ``--rank``).
        parts = [f"--{_option_name(e['loc'])}: {e['msg']}" for e in err.errors()]
        return "invalid options: " + "; ".join(parts)
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    # A cold ephemeral Prefect server on 2 cores needs more than the 20 s default, and its
    # telemetry call fails offline with a noisy error line.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # transformers warns at import that torchvision is missing; the PIL image processors it
    # falls back to are never used here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValidationError, *USER_ERRORS) as err:
        print(f"rapm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
