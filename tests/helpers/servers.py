"""Server processes for the integration tests (MLflow, Prefect, `vitops serve`) and the MLflow tracking URI."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(cmd: list[str], health_url: str, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server process and wait (up to 90 s) until `health_url` answers 200; its output goes to `log_path`."""
    log = open(log_path, "w")  # noqa: SIM115 - the process owns it; closed by stop_server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"{cmd[:4]} did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server started by `start_server` (kill it after 20 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.log.close()  # type: ignore[attr-defined]


def forget_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo an earlier test's `mlflow.set_tracking_uri` (tracking.configure), so MLFLOW_TRACKING_URI is read."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
