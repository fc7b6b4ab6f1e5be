"""The exception types that mean "the user must fix something", gathered from both layers so the
CLI and the flows can report them in one line instead of a traceback."""

from rapm_core.errors import ConfigError
from storage.errors import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StoreError, FileNotFoundError)
