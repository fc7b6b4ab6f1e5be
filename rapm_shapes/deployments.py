"""The deployments' parameters in ``prefect.yaml``: the demos' configs.

The stage flows take a required config and know nothing of the shapes domain; the deployments
carry the demos' values (:mod:`rapm_shapes.demo`) as their parameters, which the UI's parameter
form shows: the ``embedded-demo`` deployment of each flow runs ``rapm demo``'s config for it, the
pipeline's ``embedded-flow-demo`` runs ``rapm demo-flow``'s. Deployments run in the project
directory (prefect.yaml's pull step), so paths inside the project are written relative to it.
``python -m rapm_shapes.deployments`` rewrites the ``parameters`` of each deployment in
prefect.yaml from the demos (its comments kept); tests/test_prefect_e2e.py checks that
prefect.yaml says what the demos say.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from rapm_core.pipeline import PipelineConfig
from rapm_shapes.demo import DemoConfig, demo_config, flow_demo_config
from storage.atomic import write_text_atomic

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
PIPELINE = "flows/pipeline.py:pipeline_flow"


def as_pipeline(demo: DemoConfig) -> PipelineConfig:
    """A demo as the pipeline flow's own model, so that its required teacher is written out."""
    return PipelineConfig.model_validate(demo.model_dump())


# Each deployment, as (name, entrypoint), and its config: a demo's config for that flow.
DEPLOYMENTS: dict[tuple[str, str], Callable[[], BaseModel]] = {
    ("embedded-demo", PIPELINE): lambda: as_pipeline(demo_config()),
    ("embedded-demo", "flows/ingest.py:ingest_flow"): lambda: demo_config().ingest_config(),
    ("embedded-demo", "flows/trajectories.py:trajectories_flow"): lambda: demo_config().trajectories_config(),
    ("embedded-demo", "flows/distill.py:distill_flow"): lambda: demo_config().distill_config(),
    ("embedded-demo", "flows/evaluate.py:evaluate_flow"): lambda: demo_config().evaluate_config(),
    ("embedded-flow-demo", PIPELINE): lambda: as_pipeline(flow_demo_config()),
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


def deployment_parameters() -> dict[tuple[str, str], dict[str, Any]]:
    """Each deployment's parameters: its demo's config for its flow, the values the stages'
    defaults would not give (the flow's model fills in the rest)."""
    return {key: {"config": _relative(config().model_dump(mode="json", exclude_defaults=True))}
            for key, config in DEPLOYMENTS.items()}


def with_parameters(text: str, parameters: dict[tuple[str, str], dict[str, Any]]) -> str:
    """prefect.yaml's text with each deployment's ``parameters:`` block replaced by
    ``parameters[(name, entrypoint)]`` (placed after its ``entrypoint:`` line; the name is the
    ``- name:`` line that opens the deployment); every other line, comments included, is kept."""
    out: list[str] = []
    lines = text.splitlines()
    name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    parameters:"):  # an old block: skip it and its deeper-indented lines
            i += 1
            while i < len(lines) and lines[i].startswith("      "):
                i += 1
            continue
        out.append(line)
        if line.startswith("  - name: "):
            name = line.split(":", 1)[1].strip()
        if line.startswith("    entrypoint: "):
            entrypoint = line.split(":", 1)[1].strip()
            block = yaml.safe_dump({"parameters": parameters[(name, entrypoint)]}, sort_keys=False, allow_unicode=True)
            out += ["    " + b for b in block.splitlines()]
        i += 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    text = PREFECT_YAML.read_text(encoding="utf-8")
    updated = with_parameters(text, deployment_parameters())
    if updated != text:
        write_text_atomic(PREFECT_YAML, updated)
        print(f"{PREFECT_YAML}: deployment parameters rewritten from the demos")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
