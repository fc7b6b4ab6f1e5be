"""The README's "The stages, one command each" block, run as a user types it (in subprocesses,
each command its own process) on the embedded shapes teacher, with only the sizes shrunk and
the GPU options turned to CPU: every command succeeds, and its terminal shows only rapm's own
lines — no library warnings, log lines or progress bars (``flows.library_output``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from rapm_shapes.assets import EMBEDDED_TEACHER
from rapm_shapes.shapes import all_prompts

ROOT = Path(__file__).resolve().parents[1]

# What each documented command is given instead, to run on a CPU in seconds (the option must be
# in the README's command, so that the README cannot drift from what is run here).
CPU_VALUES = {"--teacher": str(EMBEDDED_TEACHER), "--dtype": "fp32", "--device": "cpu",
              "--iterations": "2", "--checkpoint-every": "1"}
SMALLER = {"evaluate": ["--num-images", "8", "--batch-size", "8"]}

# What the libraries print when they are left alone (each was seen on a stage's terminal).
LIBRARY_MARKERS = ("[transformers]", "No LoRA keys", "Warning", "warnings.warn", "Loading pipeline components",
                   "Loading weights", "it/s]", "%|")
OUR_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| INFO +\| (?![\w.]+ - )")  # ours: no library logger name


def readme_stage_commands() -> list[list[str]]:
    """The ``rapm`` commands of the README's stages block, as argv lists (``rapm`` dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The stages, one command each"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [argv[1:] for argv in commands if argv and argv[0] == "rapm"]


def on_cpu(argv: list[str]) -> list[str]:
    argv = list(argv)
    for option, value in CPU_VALUES.items():
        if option in argv:
            argv[argv.index(option) + 1] = value
    return argv + SMALLER.get(argv[0], [])


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment: none of the test suite's library quieting, no Prefect server."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "TQDM_DISABLE")}
    return {**env, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
            **extra}


def rapm(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_readme_block_documents_every_stage_and_tool():
    names = [argv[0] if argv[0] != "store" else f"store {argv[1]}" for argv in readme_stage_commands()]
    assert names == ["ingest", "trajectories", "store inspect", "store verify", "store show", "distill", "evaluate",
                     "sample", "pipeline"]
    used = {option for argv in readme_stage_commands() for option in CPU_VALUES if option in argv}
    assert used == set(CPU_VALUES), "the README's commands lost an option this test shrinks"


def test_the_readme_stage_commands_run_as_typed_and_print_only_their_own_lines(tmp_path):
    captions = [{"id": i, "caption": p} for i, p in enumerate(all_prompts()[:10])]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions), encoding="utf-8")
    env = user_env(tmp_path)
    commands = list(map(on_cpu, readme_stage_commands()))
    # The trajectories again on a local Dask cluster, whose worker processes print to this terminal too.
    sharded = next(argv for argv in commands if argv[0] == "trajectories")
    sharded = [*sharded, "--backend", "local-cluster", "--workers", "2", "--torch-threads", "1"]
    sharded[sharded.index("--out") + 1] = "work/traj-sharded.zarr"
    for argv in [*commands, sharded]:
        done = rapm(argv, tmp_path, env)
        shown = done.stdout + done.stderr
        assert done.returncode == 0, f"rapm {shlex.join(argv)}:\n{shown[-3000:]}"
        assert not [m for m in LIBRARY_MARKERS if m in shown], f"rapm {shlex.join(argv)}:\n{shown}"
        foreign = [line for line in done.stderr.splitlines() if not OUR_LOG_LINE.match(line)]
        assert not foreign, f"rapm {shlex.join(argv)}: not rapm's own lines:\n" + "\n".join(foreign)

    work = tmp_path / "work"
    assert (tmp_path / "traj0.png").is_file() and (work / "run" / "eval" / "report.md").is_file()
    assert len(list((work / "samples").glob("*.png"))) == 2 * 4 + 1  # 2 prompts × 4 images + the contact sheet

    # The same command with the libraries let through prints what the ones above kept away.
    sample = next(on_cpu(argv) for argv in readme_stage_commands() if argv[0] == "sample")
    sample[sample.index("--out") + 1] = "work/samples-shown"
    shown = rapm(sample, tmp_path, user_env(tmp_path, RAPM_LIBRARY_OUTPUT="show"))
    assert shown.returncode == 0 and "No LoRA keys associated to CLIPTextModel" in shown.stderr, shown.stderr
