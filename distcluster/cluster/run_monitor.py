"""The actor that follows a Ray Train run from the driver's node. A module of its own, importing
only Ray: the actor's process imports it (ray_train would cost that process seconds of torch)."""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
class RunMonitor:
    """Records each worker-group start (when, the epoch it resumed at, how many workers) and why
    the run must end rather than be retried: a divergence, or a user's mistake."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []
        self.failure = ""
        self.mistake = ""

    def started(self, epoch: int, workers: int) -> None:
        self.starts.append({"time": time.time(), "epoch": epoch, "workers": workers})

    def diverged(self, message: str) -> None:
        self.failure = message

    def refused(self, message: str) -> None:
        self.mistake = message

    def summary(self) -> tuple[list[dict[str, Any]], str, str]:
        return self.starts, self.failure, self.mistake
