"""The ``embedded-demo`` deployments' parameters in ``prefect.yaml``: the demo's configs.

The stage flows take a required config and know nothing of the shapes domain; the deployments
carry the demo's values (:mod:`rapm_shapes.demo`) as their parameters, which the UI's parameter
form shows. Deployments run in the project directory (prefect.yaml's pull step), so paths inside
the project are written relative to it. ``python -m rapm_shapes.deployments`` rewrites the
``parameters`` of each deployment in prefect.yaml from the demo (its comments kept);
tests/test_prefect_e2e.py checks that prefect.yaml says what the demo says.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from rapm_core.pipeline import PipelineConfig
from rapm_shapes.demo import DemoConfig, demo_config
from storage.atomic import write_text_atomic

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
# Each deployment's entrypoint and the demo's config for its flow.
FLOW_CONFIGS: dict[str, Callable[[DemoConfig], BaseModel]] = {
    # as the flow's own model, so that its required teacher is written out
    "flows/pipeline.py:pipeline_flow": lambda demo: PipelineConfig.model_validate(demo.model_dump()),
    "flows/ingest.py:ingest_flow": DemoConfig.ingest_config,
    "flows/trajectories.py:trajectories_flow": DemoConfig.trajectories_config,
    "flows/distill.py:distill_flow": DemoConfig.distill_config,
    "flows/evaluate.py:evaluate_flow": DemoConfig.evaluate_config,
}


def _relative(value: Any) -> Any:
    """Absolute paths inside the project made relative to it, in a JSON value."""
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(PROJECT_DIR):
        return str(Path(value).relative_to(PROJECT_DIR))
    return value


def deployment_parameters() -> dict[str, dict[str, Any]]:
    """Each deployment's parameters: the demo's config for its flow, the values the stages'
    defaults would not give (the flow's model fills in the rest)."""
    demo = demo_config()
    return {entrypoint: {"config": _relative(config(demo).model_dump(mode="json", exclude_defaults=True))}
            for entrypoint, config in FLOW_CONFIGS.items()}


def with_parameters(text: str, parameters: dict[str, dict[str, Any]]) -> str:
    """prefect.yaml's text with each deployment's ``parameters:`` block replaced by ``parameters``
    (placed after its ``entrypoint:`` line); every other line, comments included, is kept."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    parameters:"):  # an old block: skip it and its deeper-indented lines
            i += 1
            while i < len(lines) and lines[i].startswith("      "):
                i += 1
            continue
        out.append(line)
        if line.startswith("    entrypoint: "):
            entrypoint = line.split(":", 1)[1].strip()
            block = yaml.safe_dump({"parameters": parameters[entrypoint]}, sort_keys=False, allow_unicode=True)
            out += ["    " + b for b in block.splitlines()]
        i += 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    text = PREFECT_YAML.read_text(encoding="utf-8")
    updated = with_parameters(text, deployment_parameters())
    if updated != text:
        write_text_atomic(PREFECT_YAML, updated)
        print(f"{PREFECT_YAML}: deployment parameters rewritten from the demo")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
