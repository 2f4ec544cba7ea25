"""What may change between a checkpoint's config and the config that resumes it.

Refused (a ConfigError naming the first such key, exit 2): anything that changes the network
or the objective (`objective`, `clusters`, `prior`, `model.*`, the objective sections, the optimiser
kind and which parameters it decays); the saved weights and moments would not fit, or would
mean something else. Fewer `epochs` than the checkpoint has trained is refused too.
Everything else is allowed and reported: more epochs (a finished run goes on), the learning
rate and its schedule (applied: the lr is a function of the config and the step counter),
weight decay, momentum and betas (applied over the saved ones), workers, tracking, speed,
evaluation and checkpoint periods, augmentation, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distcluster.common.errors import ResumeRefused
from distcluster.config.schema import Config, flatten_keys

REFUSED_ON_RESUME = ("objective", "clusters", "prior", "model.", "iic.", "imc_swav.", "crlc.", "optim.name",
                     "optim.decay_1d")


@dataclass(frozen=True)
class ResumeChanges:
    """Keys whose value differs from the checkpoint's config: {key: (saved, now)}."""

    changed: dict[str, tuple[Any, Any]]

    def describe(self) -> str:
        return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in self.changed.items())


# Network keys added after checkpoints were written, with the value those checkpoints were
# trained with: a resume that changes them is refused like any other network change.
SAVED_BEFORE_THEY_EXISTED = {"model.sobel": False, "model.stages": 2, "model.pool": 2}


def resume_changes(saved: dict[str, Any], current: Config, trained_epochs: int) -> ResumeChanges:
    """The allowed changes from `saved` (a checkpoint's config, as Config.to_dict wrote it) to
    `current`; ResumeRefused (a ConfigError) for the first refused one. Other keys one side lacks
    (a version apart) are not compared."""
    before, now = {**SAVED_BEFORE_THEY_EXISTED, **dict(flatten_keys(saved))}, current.flat()
    changed = {k: (before[k], now[k]) for k in now if k in before and _differs(before[k], now[k])}
    for key, (old, new) in changed.items():
        if not any(key == r or (r.endswith(".") and key.startswith(r)) for r in REFUSED_ON_RESUME):
            continue
        raise ResumeRefused(key, new, f"the checkpoint being resumed was trained with {old!r}, and "
                          "this key changes the network or the objective; resume with the same value, "
                          "or start a new run (another --run-name or --output)")
    if current.epochs < trained_epochs:
        raise ResumeRefused("epochs", current.epochs, f"the checkpoint being resumed has trained "
                          f"{trained_epochs} epochs already; ask for at least that many")
    return ResumeChanges(changed)


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, list | tuple) and isinstance(new, list | tuple):
        return list(old) != list(new)
    return old != new
