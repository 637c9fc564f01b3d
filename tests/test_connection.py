"""A server that is down: `vitops history`, `lineage` and `approve` fail within tracking.connect_timeout_s with one
message and exit 2, under MLflow's and Prefect's default retry settings (which alone take about 250 s for MLflow)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitops.flows.connection import ServerUnreachable, connect_timeout, retries_within


def test_mlflow_retries_fit_in_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert retries_within(20) == 3 and retries_within(2) == 1 and retries_within(1) == 0
    monkeypatch.setenv("VITOPS_CONNECT_TIMEOUT_S", "7.5")
    assert connect_timeout(20) == 7.5
    monkeypatch.setenv("VITOPS_CONNECT_TIMEOUT_S", "soon")
    with pytest.raises(ServerUnreachable, match="VITOPS_CONNECT_TIMEOUT_S='soon'"):
        connect_timeout(20)


def _dead_url() -> str:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.integration
@pytest.mark.parametrize("command", [["history", "vitops-vit"], ["lineage", "vitops-vit@champion"]])
def test_a_tracking_server_that_is_down_fails_fast_with_its_message(command: list[str], tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"connect_timeout_s": 5}}))
    url = _dead_url()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_HTTP_REQUEST", "VITOPS_CONNECT"))}
    env["MLFLOW_TRACKING_URI"] = url  # MLflow's default retries: 7, with backoff, about 250 s
    # the timeout only keeps a hang from stalling the suite; the limit under test is 5 s
    done = subprocess.run([sys.executable, "-m", "vitops", "--params", str(params), *command], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"the MLflow tracking server at {url} did not answer within 5 s" in done.stderr
    assert "tracking.connect_timeout_s" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_prefect_api_that_is_down_fails_fast_with_its_message(tmp_path: Path) -> None:
    api = f"{_dead_url()}/api"
    env = os.environ | {"PREFECT_API_URL": api, "VITOPS_CONNECT_TIMEOUT_S": "4"}
    run = "8c1f6f6e-3a55-4c39-8c4e-1b7d6c2f9a10"
    done = subprocess.run([sys.executable, "-m", "vitops", "approve", run, "--approver", "alice"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"the Prefect API at {api} did not answer within 4 s" in done.stderr and "Traceback" not in done.stderr
