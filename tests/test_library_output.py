"""The libraries' output with ``flows.library_output`` routing it, outside a flow run (in a fresh
process each, as ``rapm`` routes it for the rest of its process): warnings, log lines and
progress bars stay off the terminal, an error is one line of ours. Inside a flow run they go to
the run's log: ``tests/test_prefect_e2e.py`` checks that on a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LIBRARIES_TALK = textwrap.dedent("""
    import logging, warnings
    from flows.library_output import route_library_output
    route_library_output()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    from tqdm.auto import tqdm
    diffusers_logging.get_logger("diffusers.loaders.lora_base").warning("No LoRA keys associated to CLIPTextModel")
    transformers_logging.get_logger("transformers.utils.import_utils").warning_once("requires torchvision")
    logging.getLogger("peft.tuners").warning("peft talks")
    warnings.warn("a library's UserWarning")
    for _ in tqdm(range(3), desc="Loading weights"):
        pass
    transformers_logging.get_logger("transformers.modeling_utils").error("weights are broken\\nsecond line")
    print("done")
""")


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "TQDM_DISABLE", "PREFECT_API_URL")}
    return subprocess.run([sys.executable, "-c", LIBRARIES_TALK], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT), **env_extra}, timeout=300)


def test_outside_a_run_only_a_librarys_error_reaches_the_terminal_as_one_line():
    done = _run({})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} \| ERROR +\| transformers: weights are broken",
                                            lines[0]), done.stderr


def test_show_lets_the_libraries_print_as_they_do_by_default():
    done = _run({"RAPM_LIBRARY_OUTPUT": "show"})
    assert done.returncode == 0, done.stderr
    for printed in ("No LoRA keys", "[transformers] requires torchvision", "peft talks", "UserWarning",
                    "Loading weights", "second line"):
        assert printed in done.stderr, printed
