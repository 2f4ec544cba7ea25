"""`python -m distcluster.train` as the failure tests run it: a named run in a test folder, with
its own sqlite MLflow store, and what it leaves there."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from servers import wait_for

EPOCHS = 8
# A short run on digits: 4 steps an epoch, checkpoints every epoch.
RUN = ["--epochs", str(EPOCHS), "--batch-size", "128", "--set", "max_samples=512", "--seed", "3"]
# For runs a test kills midway: Ray Train's controller polls its workers every 2 s (its default;
# distcluster asks for 0.25 s), and each epoch's report waits for a poll, so epochs take up to 2 s
# and the test has time to act after a checkpoint before the run ends.
PACED = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}


def train_command(folder: Path, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "distcluster.train", *args, "--output", str(folder / name),
            "--run-name", name, "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]


def run_train(folder: Path, name: str, *args: str, env=None) -> subprocess.CompletedProcess:
    """The run to its end; `env` is added to this process's environment."""
    return subprocess.run(train_command(folder, name, *args), capture_output=True, text=True, cwd=folder,
                          timeout=600, env={**os.environ, **(env or {})})


def summary_of(folder: Path, name: str) -> dict:
    return json.loads((folder / name / "summary.json").read_text())


def ray_checkpoints(folder: Path, name: str) -> list[Path]:
    """The checkpoints Ray Train has committed so far, by folder name (oldest first)."""
    return sorted((folder / name / "ray").glob(f"{name}/checkpoint_*/checkpoint.json"))


class Output:
    """The lines a running process has printed so far to `stream` (its stdout unless named),
    read on a thread."""

    def __init__(self, process: subprocess.Popen, stream: IO[str] | None = None) -> None:
        self.lines: list[str] = []
        source = stream or process.stdout
        self.thread = threading.Thread(target=lambda: self.lines.extend(source), daemon=True)
        self.thread.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def so_far(self) -> str:
        return "".join(self.lines)

    def text(self) -> str:
        """All it printed (waiting for its end)."""
        self.thread.join(timeout=60)
        return self.so_far()


def wait_while_running(process: subprocess.Popen, condition, what: str, output: Output | None = None) -> None:
    """Wait for `condition` while the run goes on; fail, with what it printed, if it ends first."""
    wait_for(lambda: condition() or process.poll() is not None, what=what, every=0.5)
    assert process.poll() is None, f"the run ended before {what}: {output.text()[-3000:] if output else ''}"


def kill_driver(process: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started in its session (nothing when it has ended).
    The drivers here join a Ray head, which then ends their job's actors, workers included."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
