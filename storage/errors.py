"""Errors about stores and input files that the user can fix; the message names the file and the problem."""


class StoreError(ValueError):
    """A store or source file is missing, malformed, or was made with a different config."""


class SourceError(StoreError):
    """A prompt source file cannot be read; ``str()`` is ``path:line: problem``."""

    def __init__(self, path, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


class ConfigMismatchError(StoreError):
    """A store or run dir exists but was made with a different config; it is never appended to."""
