"""Shared fixtures: offline-safe environment, a real MLflow tracking server on 127.0.0.1, tiny data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Offline-safe defaults, set before any library reads them: without these, timm's hub lookup and the
# telemetry of MLflow, DVC and Prefect wait on hosts this machine cannot reach. DO_NOT_TRACK also turns off
# OpenVINO's and NNCF's (deploy/openvino.py hides their telemetry module, as they read no variable of their own).
_PREFECT_HOME = tempfile.mkdtemp(prefix="vitops-prefect-")
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": _PREFECT_HOME,
    "GX_ANALYTICS_ENABLED": "false",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)


def _free_port() -> int:
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    store = [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *store,
    ]
    proc = start_server(cmd, f"{url}/health", root / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 (UI off, its own PREFECT_HOME and database); yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_server(cmd, f"{api}/health", home / "server.log", env=env)
    yield api
    stop_server(proc)


@pytest.fixture()
def tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points MLFLOW_TRACKING_URI at the test server for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    forget_tracking_uri(monkeypatch)
    return mlflow_server


def forget_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo an earlier test's `mlflow.set_tracking_uri` (tracking.configure), so MLFLOW_TRACKING_URI is read."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
