"""The one line a ``rapm`` command prints when Ctrl-C stops it: where it stopped, and that the
same command resumes.

Every stage keeps its finished work on disk as it goes (checkpoints, complete trajectories,
stores written whole), so an interrupt loses at most the work since the last of those. What
was kept is read back from the stores through storage's API, per command name, so the stage
modules need no hook of their own; a command without a reader here gets a generic line.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


# Each reader imports its store only when its command was interrupted: the CLI imports this
# module for every command, and the checkpoint store brings torch.
def _distill(args: argparse.Namespace) -> str:
    from storage.checkpoints import CheckpointStore

    ckpts = CheckpointStore(args.out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a corrupt newer checkpoint is the resumed run's to report
        newest = ckpts.latest_valid()
    if newest is None:
        return f"interrupted before the first checkpoint of {args.out}; run the same command to start again"
    step = int(newest.name.split("-")[1])
    return (f"interrupted; kept checkpoint {newest.name} (iteration {step}) in {ckpts.dir}; "
            "run the same command to resume from it")


def _trajectories(args: argparse.Namespace) -> str:
    from storage.trajectory_store import TrajectoryStore

    try:
        mask = TrajectoryStore(args.out).complete_mask()
    except Exception:  # noqa: BLE001 - no store yet (interrupted before it was created)
        return f"interrupted before {args.out} was created; run the same command to start again"
    return (f"interrupted; kept {int(mask.sum())}/{len(mask)} complete trajectories in {args.out}; "
            "run the same command to generate the rest")


def _evaluate(args: argparse.Namespace) -> str:
    if not getattr(args, "feature_store", None):  # in memory: nothing kept but a finished eval dir
        return "interrupted; no evaluation is kept without --feature-store; run the same command to start again"
    from storage.eval_store import EvalStore

    store = EvalStore(args.feature_store)
    masks = [store.complete_mask(m) for m in store.methods()]
    return (f"interrupted; kept {sum(int(m.sum()) for m in masks)}/{sum(len(m) for m in masks)} complete batches "
            f"of {len(masks)} methods in {args.feature_store}; run the same command to sample the rest")


def _sample(args: argparse.Namespace) -> str:
    # The images are written after the last batch: an interrupt leaves the last run's files as they were.
    return f"interrupted; nothing new in {args.out}; run the same command to sample again"


WHERE_STOPPED: dict[str, Callable[[argparse.Namespace], str]] = {
    "distill": _distill,
    "trajectories": _trajectories,
    "evaluate": _evaluate,
    "sample": _sample,
}


def where_stopped(args: argparse.Namespace) -> str:
    """What the interrupted command kept; never raises (it runs while the command is stopping)."""
    describe = WHERE_STOPPED.get(getattr(args, "command", None))
    if describe is not None:
        try:
            return describe(args)
        except Exception:  # noqa: BLE001 - a half-written store must not turn Ctrl-C into a traceback
            pass
    return "interrupted; finished work is kept; run the same command to resume"
