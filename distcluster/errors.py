"""Errors that mean "the user asked for something impossible" (exit code 2)."""


class UserError(Exception):
    """A mistake in the user's input or configuration; printed as one line, exit 2."""


class ConfigError(UserError):
    """An unknown config key or an impossible value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason} (got {value!r})")
        self.key = key
        self.value = value
