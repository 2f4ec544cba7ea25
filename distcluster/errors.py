"""Errors with their own exit codes: user mistakes (2) and runs that failed cleanly (1)."""


class UserError(Exception):
    """A mistake in the user's input or configuration; printed as one line, exit 2."""


class ConfigError(UserError):
    """An unknown config key or an impossible value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason} (got {value!r})")
        self.key = key
        self.value = value


class RunFailed(RuntimeError):
    """Training stopped for a reason worth one clear line (exit 1, no traceback)."""


class TrainingDiverged(RunFailed):
    """The loss stayed non-finite for cfg.max_bad_steps consecutive steps."""
