"""Shared fixtures: offline-safe environment, a real MLflow tracking server and a real Prefect server on 127.0.0.1
(one of each per test session), tiny digits. Plain helper functions live in tests/helpers/."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.servers import forget_tracking_uri, free_port, start_server, stop_server
from helpers.vit import write_digits

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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
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


ADMIN_PASSWORD = "admin-pw-for-tests-only"
PREFECT_AUTH_STRING = "vitops:prefect-pw-for-tests-only"


@pytest.fixture(scope="session")
def auth_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `mlflow server --app-name basic-auth` on 127.0.0.1 (users, permissions; everyone else READ), its admin
    `admin` with ADMIN_PASSWORD; yields its URL, admin credentials and artifact folder."""
    root = tmp_path_factory.mktemp("auth-mlflow-server")
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
           str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    env = os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "vitops-tests-only"}
    proc = start_server(cmd, f"{url}/health", root / "server.log", env=env)
    yield {"url": url, "user": "admin", "password": ADMIN_PASSWORD, "artifacts": str(root / "artifacts")}
    stop_server(proc)


@pytest.fixture(scope="session")
def auth_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` that asks every request for PREFECT_AUTH_STRING; yields its API URL and it."""
    home = tmp_path_factory.mktemp("auth-prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
                        "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH_STRING}  # fmt: skip
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_server(cmd, f"{api}/health", home / "server.log", env=env)
    yield {"api": api, "auth": PREFECT_AUTH_STRING}
    stop_server(proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 (UI off, its own PREFECT_HOME and database); yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
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


@pytest.fixture()
def server(tracking: str) -> str:
    """The test server, also when an earlier test pinned another URI with `mlflow.set_tracking_uri`."""
    return tracking  # `tracking` also forgets a URI an earlier test pinned


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """40 digit images at 32x32 as the train and val datasets of a tiny ViT (one pair per test module)."""
    from vitops.vit.bundle import ModelMeta
    from vitops.vit.data import create_dataset

    root = tmp_path_factory.mktemp("digits")
    rows = write_digits(root, size=40)
    meta = ModelMeta("vit_tiny_patch16_224", [str(d) for d in range(10)], 32, crop_pct=1.0)
    return create_dataset(root, rows, meta, "train"), create_dataset(root, rows, meta, "val")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cuda_aot_release(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny model folder and its torch-aot FP16 engine built on this machine's GPU, once per session (the gpu tests
    of the engine and of the pyfunc model share the ~30 s build); skipped, visibly, without CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from helpers.engines import aot_release

    return aot_release(tmp_path_factory.mktemp("cuda-aot"), "fp16", "cuda")
