"""Errors with their own exit codes: user mistakes (2) and runs that failed cleanly (1)."""


MAX_MESSAGE = 400  # characters: an error is one readable line, whatever the input held


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with its whitespace runs (newlines included) as single spaces, cut to `limit`."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


class UserError(Exception):
    """A mistake in the user's input or configuration; printed as one line, exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class CorruptImage(UserError):
    """An image that cannot be decoded; each command words its own way around it."""


class ConfigError(UserError):
    """An unknown config key or an impossible value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason} (got {one_line(repr(value), 120)})")
        self.key = key
        self.value = value


class ResumeRefused(ConfigError):
    """A checkpoint that cannot take the run's config: the same on every rank (the state is rank
    0's, broadcast), so workers end the run with it instead of being restarted."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, Kubernetes): the command ends as on Ctrl-C, clean-up included,
    with exit 143."""


class RunFailed(RuntimeError):
    """Training stopped for a reason worth one clear line (exit 1, no traceback)."""


class TrainingDiverged(RunFailed):
    """The loss stayed non-finite for cfg.max_bad_steps consecutive steps."""


def check(ok: bool, key: str, value: object, reason: str) -> None:
    """ConfigError naming `key` unless `ok`: how every config section states a rule."""
    if not ok:
        raise ConfigError(key, value, reason)


def check_range(key: str, pair: tuple[float, float], low: float, high: float) -> None:
    ok = len(pair) == 2 and low <= pair[0] <= pair[1] <= high
    check(ok, key, list(pair), f"must be [min, max] with {low} <= min <= max <= {high}")
