"""Real local services for tests: free ports and an `mlflow server` on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


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
