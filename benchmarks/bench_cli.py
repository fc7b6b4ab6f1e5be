"""How long a ``rapm`` command takes from the shell: ``rapm --help``, ``rapm distill --help``,
``rapm store inspect STORE`` and ``rapm ingest`` of 8 prompts, each a fresh process, as typed.

Two checkouts side by side: ``--before DIR`` (e.g. the code before a change, unpacked with
``git archive REF | tar -x -C DIR``) and ``--after DIR`` (default: this checkout). Each command
runs with ``PYTHONPATH`` and the working directory set to its checkout, ``PREFECT_API_URL``
unset (what a user without ``make up`` gets) and a ``PREFECT_HOME`` of its own per side. The
sides and commands are interleaved repeat by repeat, so a busy spell on a shared machine slows
both alike; one untimed warm-up round first (a user's second command: a filled page cache, and a
migrated Prefect database for code that starts a temporary server). Medians, min–max beside them.

Run: ``.venv/bin/python benchmarks/bench_cli.py --before /tmp/rapm-before [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"a {colour} {shape}" for colour, shape in zip(
    ("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    ("circle", "square", "triangle", "circle", "square", "triangle", "circle", "square"))]


def make_store(directory: Path) -> Path:
    """A small trajectory store (tiny teacher, 2 prompts) for ``rapm store inspect``."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # set-up noise, not the benchmark's output
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from rapm_core.trajectories.config import TrajectoriesConfig
    from rapm_core.trajectories.generate import generate_trajectories
    from rapm_testing.tiny_teacher import build_tiny_sd15
    from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

    teacher = build_tiny_sd15(directory / "teacher")
    write_prompt_store(directory / "prompts", [PromptRecord(prompt_id(t), t) for t in PROMPTS[:2]])
    out = directory / "trajectories.zarr"
    generate_trajectories(TrajectoriesConfig(prompts=str(directory / "prompts"), teacher=str(teacher), out=str(out),
                                             slots=2, steps_per_slot=2, device="cpu", batch_size=2),
                          log=lambda _m: None)
    return out


def run(checkout: Path, args: list[str], prefect_home: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: rapm {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code to compare with")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout of the code under test (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    sides = {"before": opts.before.resolve(), "after": opts.after.resolve()}

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tmp = Path(tmp)
        store = make_store(tmp / "fixture")
        source = tmp / "prompts.txt"
        source.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
        commands = {
            "rapm --help": lambda out: ["--help"],
            "rapm distill --help": lambda out: ["distill", "--help"],
            "rapm store inspect STORE": lambda out: ["store", "inspect", str(store)],
            "rapm ingest (8 prompts)": lambda out: ["ingest", str(source), "--out", str(out)],
        }
        times: dict[tuple[str, str], list[float]] = {(c, s): [] for c in commands for s in sides}
        load_before = os.getloadavg()
        for repeat in range(-1, opts.repeats):  # -1: the warm-up round
            for name, argv in commands.items():
                for side, checkout in sides.items():
                    seconds = run(checkout, argv(tmp / f"prompts-{side}-{repeat}"), tmp / f"prefect-{side}")
                    if repeat >= 0:
                        times[(name, side)].append(seconds)
        load_after = os.getloadavg()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load avg {load_before[0]:.1f} → "
          f"{load_after[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {opts.repeats} repeats")
    print(f"before: {sides['before']}\nafter:  {sides['after']}\n")
    print("| command | before (s) | after (s) | after / before |\n|---|---|---|---|")
    for name in commands:
        cells = []
        for side in sides:
            xs = times[(name, side)]
            cells.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})")
        ratio = statistics.median(times[(name, "after")]) / statistics.median(times[(name, "before")])
        print(f"| `{name}` | {cells[0]} | {cells[1]} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
