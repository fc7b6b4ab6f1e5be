"""What every stage flow does alike: a progress artifact that follows the engine's ``Progress``."""

from __future__ import annotations

from typing import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from rapm_core.progress import Progress


class ProgressArtifact:
    """A Prefect progress artifact updated at most once per percent (large stages have many
    steps), its description carrying the rate and ETA the logs show."""

    def __init__(self, description: str, log: Callable[[str], None] | None = None):
        self.description, self.log = description, log
        self.id = create_progress_artifact(0.0, description=description)
        self._shown, self._last = -1, ""

    def __call__(self, p: Progress) -> None:
        percent = int(p.percent)
        if percent == self._shown:
            return
        self._shown, self._last = percent, p.line()
        update_progress_artifact(self.id, float(percent), description=f"{self.description}: {self._last}")
        if self.log is not None:
            self.log(p.line())

    def finish(self) -> None:
        last = f" ({self._last})" if self._last else ""
        update_progress_artifact(self.id, 100.0, description=f"{self.description}: done{last}")
