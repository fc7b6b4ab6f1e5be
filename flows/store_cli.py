"""``rapm store inspect|verify|show``: look into a trajectory store without writing code
(:mod:`storage.trajectory_inspect`, :mod:`rapm_core.trajectories.preview`)."""

from __future__ import annotations

import json
from pathlib import Path

from storage.trajectory_inspect import inspect_store, repair_store, verify_store


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="store_command", required=True)
    p = sub.add_parser("inspect", help="schema, teacher, N, M, guidance, shapes, progress, size, sample prompts")
    p.add_argument("path", metavar="PATH", help="trajectory store")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="read every chunk of every complete trajectory; list the damaged ones")
    p.add_argument("path", metavar="PATH", help="trajectory store")
    p.add_argument("--repair", action="store_true",
                   help="mark damaged trajectories incomplete, so `rapm trajectories` regenerates exactly them")
    p.set_defaults(func=_verify)
    p = sub.add_parser("show", help="decode one trajectory's slot boundaries and x̂0s into a PNG strip")
    p.add_argument("path", metavar="PATH", help="trajectory store")
    p.add_argument("--index", type=int, required=True, help="trajectory index")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--teacher", default=None, help="teacher to take the VAE from (default: the one the store records)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="decode device")
    p.set_defaults(func=_show)


SHOWN_PROMPT_CHARS = 80


def _flow_facts(path: str) -> dict:
    """For a rectified-flow store, the ``sigmas=`` with which a stock pipeline call reproduces its
    trajectories (``stock_sigmas``); nothing for other stores."""
    from rapm_core.flow_grid import is_flow_config, stock_sigmas
    from storage.trajectory_store import TrajectoryStore

    schema = TrajectoryStore(path).schema
    if not is_flow_config(schema.scheduler_config):
        return {}
    return {"stock_sigmas": stock_sigmas(schema.num_slots, schema.steps_per_slot)}


def _inspect(args) -> int:
    facts = inspect_store(args.path) | _flow_facts(args.path)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for key, value in facts.items():
        if key == "shapes":
            value = ", ".join(f"{k} {tuple(v)}" for k, v in value.items())
        elif key == "sample_prompts":  # a line each, however long the prompt (--json has them whole)
            value = " | ".join(p if len(p) <= SHOWN_PROMPT_CHARS else p[:SHOWN_PROMPT_CHARS - 1] + "…" for p in value)
        print(f"{key:>24}: {value}")
    return 0


def _verify(args) -> int:
    """Exit 0 when nothing is damaged (or all of it was marked for regeneration), else 1."""
    report = verify_store(args.path)
    for line in report.lines():
        print(line)
    if report.damaged and args.repair:
        repair_store(args.path, report.damaged)
        print(f"marked {len(report.damaged)} trajectories incomplete; re-run `rapm trajectories` with the store's "
              f"options to regenerate them")
        return 0
    return 1 if report.damaged else 0


def _show(args) -> int:
    from rapm_core.teacher import resolve_device  # torch and the VAE: only for rendering
    from rapm_core.trajectories.preview import trajectory_strip
    from storage.trajectory_store import TrajectoryStore

    store = TrajectoryStore(args.path)
    strip, prompt = trajectory_strip(store, args.index, resolve_device(args.device), args.teacher)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(f"{args.out}: trajectory {args.index} ({prompt!r}), {store.schema.num_slots + 1} slot boundaries")
    return 0
