"""Real local services for tests: free ports, an `mlflow server` and a Ray head on 127.0.0.1."""

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE = 200 * 2**20  # bytes per test node: the tests pass little data through Ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 300, what: str = "condition", every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=1):
            return True
    except OSError:
        return False


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """An `mlflow server` (sqlite backend, local artifact root); stop it with stop_server."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder}/server.db", "--default-artifact-root",
         str(folder / "artifacts"), "--workers", "1"],
        # MLflow 3's job runner (three huey consumer processes, for GenAI scorers) is no part of
        # what distcluster uses: without it a test server took 5.7 instead of 24.5 CPU-seconds over
        # its first 15 s (start, then 10 s idle; 2-core machine).
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(uri), timeout=120, what="mlflow server")
    return server, uri


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@contextmanager
def mlflow_server(folder: Path):
    server, uri = start_mlflow_server(folder)
    try:
        yield uri
    finally:
        stop_server(server)


@dataclass
class RayHead:
    """A `ray start --head` on 127.0.0.1 with token authentication: `env` joins it (RAY_ADDRESS
    and the token), `dashboard` is the address `ray job` commands take."""

    env: dict[str, str]
    dashboard: str
    process: subprocess.Popen  # `ray start --head --block`: every Ray process of the node is below it

    def train_processes(self) -> list:
        """The live Ray Train worker and controller processes of this node (by the process titles
        Ray gives its actors), which are what write and delete a run's checkpoints."""
        import psutil

        found = []
        for process in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                title = " ".join(process.cmdline())
                if process.status() != psutil.STATUS_ZOMBIE and ("RayTrainWorker" in title
                                                                 or "TrainController" in title):
                    found.append(process)
        return found

    def job_env(self) -> dict[str, str]:
        """The environment of `ray job` commands, which take the dashboard's address instead."""
        return {key: value for key, value in {**os.environ, **self.env}.items() if key != "RAY_ADDRESS"}


@contextmanager
def ray_head(cpus: int = 2, settings: dict[str, str] | None = None):
    """A Ray cluster of one node, stopped afterwards by killing the process group it started in.
    `settings`: Ray's own environment variables for the head (RAY_health_check_period_ms...)."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    # As the README: the venv activated (its bin first on PATH) before `ray start`, so that a
    # job's plain `python` is the venv's.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Ray's helpers without an address (the job agent, the placement-group cleaner) look up "the
    # newest cluster" in $RAY_TMPDIR/ray: make that this head's own folder.
    env["RAY_TMPDIR"] = temp_dir
    port, dashboard = free_port(), free_port()
    head_env = {**env, **(settings or {})}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--num-cpus={cpus}",
         f"--temp-dir={temp_dir}/ray", "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE}",
         *_agent_port()],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        joined = {key: env[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "PATH")}
        yield RayHead({**joined, "RAY_ADDRESS": f"127.0.0.1:{port}"}, address, head)
    finally:
        stop_ray_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _agent_port() -> list[str]:
    """Each node's dashboard agent on a free port. Ray's default, 52365, is one per machine: a
    second node's agent then runs without its HTTP server, and a head without it answers every
    `ray job submit` with "No available agent to submit job"."""
    return [f"--dashboard-agent-listen-port={free_port()}"]


def start_ray_node(head: RayHead, cpus: int) -> subprocess.Popen:
    """Another Ray node on this machine, joining `head`; it is up when the cluster has its CPUs."""
    before = _cluster_cpus(head)
    node = subprocess.Popen(
        [RAY, "start", "--block", f"--address={head.env['RAY_ADDRESS']}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={cpus}", f"--object-store-memory={OBJECT_STORE}", "--disable-usage-stats",
         *_agent_port()],
        env={**os.environ, **head.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_for(lambda: node.poll() is not None or _cluster_cpus(head) >= before + cpus, timeout=120,
                 what="the Ray node to join", every=2)  # each look is a `ray status` process
        assert node.poll() is None, "ray start --address exited"
    except BaseException:
        stop_ray_node(node)
        raise
    return node


def _cluster_cpus(head: RayHead) -> float:
    """The CPUs of the cluster's live nodes, as `ray status` counts them (`0.0/2.0 CPU`, maybe
    followed by what placement groups reserve)."""
    done = subprocess.run([RAY, "status", f"--address={head.env['RAY_ADDRESS']}"], capture_output=True,
                          text=True, env={**os.environ, **head.env})
    found = re.search(r"([\d.]+)/([\d.]+) CPU\b", done.stdout)
    return float(found.group(2)) if found else 0.0


def kill_ray_node(node: subprocess.Popen) -> None:
    """SIGKILL a node as a pre-empted machine dies: `ray start` and every process under it (its
    raylet and the workers the raylet started), found by PID from the process we started."""
    import psutil

    processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    node.wait()


def stop_ray_node(node: subprocess.Popen) -> None:
    """End a `ray start --block` we started, and its process group, at once: a test node keeps
    nothing worth Ray's graceful stop, which takes over 10 s. A node kill_ray_node ended (reaped,
    every process gone) is left alone."""
    if node.returncode is not None:
        return
    os.killpg(node.pid, signal.SIGKILL)
    node.wait()
