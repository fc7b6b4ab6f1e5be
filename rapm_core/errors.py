"""Errors the user can fix (a bad teacher id, an impossible N/M, a wrong option), as opposed to bugs."""


class ConfigError(ValueError):
    """An input or option that cannot work; the message says what to change."""
