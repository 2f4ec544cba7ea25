"""What Ray's nodes publish to the driver stays off the command's stdout: Ray's tuning hints go
to the log (they are in the raylet's own log too), everything else to stderr."""

import logging
import os
import subprocess
import sys

import pytest

from distcluster.cluster.ray_messages import logger, show

HINT = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 10.0.0.1, "
        "which is 4x the maximum expected startup concurrency (2).")


def test_a_tuning_hint_goes_to_the_log_and_nothing_to_the_terminal(capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        show({"job_id": None, "type": "worker_pool_large", "error_message": HINT, "timestamp": 0.0})
    printed = capsys.readouterr()
    assert printed.out == printed.err == ""
    assert [r.getMessage() for r in caplog.records] == [f"ray: {HINT}"]


def test_any_other_message_goes_to_stderr(capsys):
    show({"job_id": None, "type": "worker_died", "error_message": "a worker died: killed for memory",
          "timestamp": 0.0})
    printed = capsys.readouterr()
    assert printed.out == "" and "a worker died: killed for memory" in printed.err


# Tasks waiting at once make Ray start a worker each: past 4x its guess at startup concurrency
# (the CPU count) the raylet publishes its worker-pool hint (at 8 workers in every sweep on 2
# cores; 20 tasks there). The script waits for the hint to reach the logger, an event, not a time.
ROUTED = """
import glob, logging, os, sys, threading, time
import ray
from distcluster.cluster.ray_messages import logger
from distcluster.cluster.ray_train import init_ray

seen = threading.Event()
class Caught(logging.Handler):
    def emit(self, record):
        if "PYTHON worker processes" in record.getMessage():
            seen.set()
logger.addHandler(Caught())
logger.setLevel(logging.DEBUG)
init_ray()

@ray.remote(num_cpus=0.01)
def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.05)

done = sys.argv[1]
tasks = [wait_for.remote(done) for _ in range(4 * os.cpu_count() + 12)]  # past 4x Ray's guess
assert seen.wait(240), "Ray published no worker-pool hint"
open(done, "w").close()
ray.get(tasks)
logs = glob.glob(os.path.join(os.environ["RAY_TMPDIR"], "**", "raylet.out"), recursive=True)
print("hint in raylet.out:", any("PYTHON worker processes" in open(p).read() for p in logs))
"""


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_the_raylet_hint_stays_in_rays_log_not_on_stdout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}  # a local instance
    done = subprocess.run([sys.executable, "-c", ROUTED, str(tmp_path / "done")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "hint in raylet.out: True\n"
    assert "PYTHON worker processes" not in done.stderr
