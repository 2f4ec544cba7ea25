"""`python -m distcluster.train` as the failure tests run it: a named run in a test folder, with
its own sqlite MLflow store, and what it leaves there."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import torch
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


def worker_pid(printed: Output) -> int:
    """The run's worker, by the PID in the prefix Ray gives its lines (`pid=N` or `pid=N, ip=...`;
    other Ray jobs on the head are not this driver's to print)."""
    found = re.search(r"\(RayTrainWorker pid=(\d+)[,)]", printed.so_far())
    assert found, f"no Ray Train worker has printed yet: {printed.so_far()[-3000:]}"
    return int(found.group(1))


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the prefixes it gives forwarded lines


def forwarded_lines(printed: str) -> list[str]:
    """The lines Ray forwarded from its processes (`(TrainController pid=N) ...`, `(raylet) ...`),
    but the training workers' own lines."""
    lines = ANSI_COLOUR.sub("", printed).splitlines()
    return [line for line in lines if line.startswith("(") and not line.startswith("(RayTrainWorker pid=")]


def ray_lines(printed: str) -> list[str]:
    """forwarded_lines and the lines of Ray's C++ logs (`core_worker.cc:2465: ...`)."""
    forwarded = set(forwarded_lines(printed))
    return [line for line in ANSI_COLOUR.sub("", printed).splitlines() if line in forwarded or ".cc:" in line]


def assert_one_line_per_event(printed: str, epochs: int, workers: int) -> None:
    """What a finished run printed (stdout, or a job's whole log): each epoch's line and each
    worker's "done" line once, no line of Ray's own, and the summary line last. Ray's forwarding
    printed every worker line once per Ray node on the machine, a rank's last line after the
    summary (held back by its de-duplication), and its internal errors."""
    lines = ANSI_COLOUR.sub("", printed).strip().splitlines()
    for epoch in range(1, epochs + 1):
        said = [line for line in lines if f") epoch {epoch}/{epochs} " in line]
        assert len(said) == 1, said
    for rank in range(workers):
        said = [line for line in lines if f"rank {rank} of {workers}: done" in line]
        assert len(said) == 1, said
    assert not ray_lines(printed), ray_lines(printed)
    assert lines[-1].startswith("summary: "), lines[-5:]


TIMING = ("train/images_per_second", "train/epoch_seconds", "train/serial_share",
          "eval/seconds", "train/peak_rss_gib")


def assert_same_training(resumed: dict, uninterrupted: dict) -> None:
    """Weights, BatchNorm statistics, optimiser state, guard counters and every epoch's metrics
    (but the clock's) identical, bit for bit."""
    for key in ("epoch", "step", "head", "guard"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    mine, theirs = resumed["optimizer"]["state"], uninterrupted["optimizer"]["state"]
    assert mine.keys() == theirs.keys()
    for index, values in theirs.items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(mine[index][key]), torch.as_tensor(value)), (index, key)
    assert resumed["optimizer"]["param_groups"] == uninterrupted["optimizer"]["param_groups"]
    untimed = [[{k: v for k, v in epoch.items() if k not in TIMING} for epoch in run["history"]]
               for run in (resumed, uninterrupted)]
    assert untimed[0] == untimed[1]
