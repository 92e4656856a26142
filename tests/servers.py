"""Test helpers shared by the test modules: free loopback ports, a real ``mlflow server`` on 127.0.0.1, and
whether a process has exited."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether process ``pid`` has exited (or is a zombie) within ``timeout`` seconds (reads Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` (sqlite backend, local artifact root), polled on /health until it answers."""
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / f"server-{port}.log", "a") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{root / 'server.db'}", "--default-artifact-root", str(root / "artifacts")],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    pytest.fail(f"mlflow server did not start: {(root / f'server-{port}.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (the process group this test started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):  # uvicorn workers share the group: none may outlive the test
        os.killpg(proc.pid, signal.SIGKILL)
