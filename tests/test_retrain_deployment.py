"""The retrain deployments for real: `prefect server start` and `mlflow server` on 127.0.0.1, the deployments
served by `vitops serve`, and `prefect deployment run` from the command line. Two retrains of the same model
triggered at once: the second waits for the first (deployment limit 1, ENQUEUE; the flow's own strict global
limit besides), then finds data, params and code unchanged and ends Skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from helpers.projects import make_project
from helpers.servers import stop_server
from mlflow import MlflowClient

pytestmark = pytest.mark.integration
MODEL = "deployed-digits"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, prefect_server: str, mlflow_server: str) -> Iterator[dict]:
    """A project whose deployments `vitops serve` serves against the real servers."""
    root = tmp_path_factory.mktemp("deployed") / "project"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        params = make_project(root, MODEL)
    env = os.environ | {"PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server}
    log = open(root.parent / "serve.log", "w")  # noqa: SIM115 - closed by stop_server
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitops", "--params", str(params), "serve"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 120
    while "retrain/on-demand" not in _prefect(env, "deployment", "ls").stdout:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"vitops serve did not start: {(root.parent / 'serve.log').read_text()[-3000:]}")
        time.sleep(2)
    yield {"env": env, "params": params, "log": root.parent / "serve.log"}
    stop_server(proc)


def _prefect(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True, timeout=120
    )


def _flow_run(env: dict, run_id: str) -> dict:
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=10) as resp:
        return json.loads(resp.read())


def _wait_final(env: dict, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = _flow_run(env, run_id)
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"flow run {run_id} still {run['state']['name']}"
        time.sleep(2)


def _wait_running(env: dict, run_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _flow_run(env, run_id)["state"]["type"] in ("SCHEDULED", "PENDING"):
        assert time.monotonic() < deadline, f"flow run {run_id} never started"
        time.sleep(1)


def _trigger(env: dict, *params: str) -> str:
    out = _prefect(env, "deployment", "run", "retrain/on-demand", *(p for kv in params for p in ("--param", kv)))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split("UUID: ")[1].split()[0]


def test_deployment_run_retrains_and_two_at_once_queue_up(served: dict, mlflow_server: str) -> None:
    env = served["env"]
    schedules = _prefect(env, "deployment", "inspect", "retrain/nightly").stdout
    assert "0 2 * * *" in schedules  # the nightly schedule from params.yaml
    bad = _prefect(env, "deployment", "run", "retrain/on-demand", "--param", "force=3")
    assert bad.returncode != 0  # --param values are JSON and are validated against the flow's signature

    first = _trigger(env, "force=true")
    _wait_running(env, first)  # so the second is the one that waits (both start as subprocesses of serve)
    second = _trigger(env)  # same inputs: waits for the first, then skips
    done = _wait_final(env, first)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert "alias candidate -> version 1" in done["state"]["message"]
    queued = _wait_final(env, second)
    assert queued["state"]["name"] == "Skipped", queued["state"]
    assert queued["end_time"] >= done["end_time"]  # it waited for the first instead of retraining beside it

    client = MlflowClient(mlflow_server)
    assert client.get_registered_model(MODEL).aliases == {"candidate": "1"}
    version = client.get_model_version(MODEL, "1")
    parent = client.search_runs(
        [client.get_experiment_by_name(MODEL).experiment_id], f"tags.`prefect.flow_run_id` = '{first}'"
    )
    assert len(parent) == 1 and parent[0].data.tags["vitops.outcome"] == "passed"
    assert version.tags["gate.passed"] == "true"
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{env['PREFECT_API_URL']}/artifacts/filter",
            data=json.dumps({"artifacts": {"flow_run_id": {"any_": [first]}}}).encode(),
            headers={"Content-Type": "application/json"},
        ),
        timeout=10,
    ) as resp:
        keys = {a["key"] for a in json.loads(resp.read())}
    assert {f"{MODEL}-kpi-table", f"{MODEL}-gate-decision", f"{MODEL}-mlflow-run"} <= keys


def test_pilot_stage_through_its_deployment(served: dict, mlflow_server: str, tmp_path) -> None:
    """`prefect deployment run 'pilot/staged'` with JSON string parameters: the candidate the retrain registered
    goes into its shadow pilot (no champion yet) and gets `pilot`."""
    from vitops.data_checks.sample import write_line_batch

    env = served["env"]
    write_line_batch(tmp_path / "line")
    missing = _prefect(env, "deployment", "run", "pilot/staged")
    assert missing.returncode != 0  # `stage` has no default
    out = _prefect(env, "deployment", "run", "pilot/staged", "--param", 'stage="shadow"',
                   "--param", f'batch="{tmp_path / "line"}"')  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    run = _wait_final(env, out.stdout.split("UUID: ")[1].split()[0])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert "no champion" in run["state"]["message"]
    aliases = MlflowClient(mlflow_server).get_registered_model(MODEL).aliases
    assert aliases["pilot"] == aliases["candidate"]  # the retrain's candidate is in its pilot
