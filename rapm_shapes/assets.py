"""Where the embedded default's committed assets live (the project's ``assets/`` directory)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TEACHER = ASSETS / "shapes-teacher"
EMBEDDED_FLOW_TEACHER = ASSETS / "shapes-flow-teacher"
EMBEDDED_EVALUATOR = ASSETS / "shapes-evaluator"
