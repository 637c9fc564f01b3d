"""The drift check of the line's images against a real `prefect server start` and a real `mlflow server`: `vitops
drift` and the `drift/daily` deployment that `vitops serve` serves record their verdict (an MLflow run, a Prefect
artifact); a planted strong drift emits `vitops.drift.detected` and, with retrain_on_drift, creates a flow run of
the retrain deployment params.yaml names (a stand-in deployment nobody serves, so the run stays scheduled); the
automation of docs/operations.md, applied with `prefect automation create --from-file`, does the same on the event.

The log is written with `PredictionLog` and `keep_image`, as the endpoint writes it: the training images themselves
three hours ago (no drift), bright images in the last hour (a strong drift), nothing on 2000-01-01 (too few)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers.data import write_clean
from helpers.registry import unique
from helpers.servers import forget_tracking_uri, stop_server
from mlflow import MlflowClient
from PIL import Image

from vitops.data_checks.manifest import scan_dataset, write_manifest
from vitops.deploy.prediction_log import Prediction, PredictionLog, keep_image
from vitops.flows.records import artifact_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
STANDIN = "retrain-standin"


def _api(env: dict[str, str], path: str, body: Any = None, method: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read()
    return json.loads(text) if text else None


def _standin(env: dict[str, str], name: str) -> str:
    """A deployment `retrain-standin/<name>` that nobody serves: a run of it stays scheduled. Its id."""
    flow = _api(env, "/flows/", {"name": STANDIN})
    return _api(env, "/deployments/", {"name": name, "flow_id": flow["id"]})["id"]


def _runs_of(env: dict[str, str], deployment_id: str) -> list[dict]:
    return _api(env, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})


def _log(folder: Path, model: str, images: list[bytes], when: float) -> None:
    with PredictionLog(folder) as plog:
        for i, data in enumerate(images):
            sha = hashlib.sha256(data).hexdigest()
            kept = keep_image(folder, sha, data, ".png")
            plog.append(Prediction(when + i, f"r{when}{i}", sha, model, "1", "onnxruntime-fp32", "a", 0.9, 2.0,
                                   "champion", "st-1", image=kept))  # fmt: skip


def _bright(count: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(np.clip(rng.normal(230, 6, (24, 24, 3)), 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def drift_env(tmp_path_factory: pytest.TempPathFactory, prefect_server: str, mlflow_server: str) -> Iterator[dict]:
    """A champion whose version logged its training manifest, a prediction log, params.yaml, `vitops serve`."""
    root = tmp_path_factory.mktemp("drift")
    name = unique("drift-line")
    train = write_clean(root / "train", {"a": 15, "b": 15}, seed=40)
    manifest = write_manifest(scan_dataset(root / "train", {"train": 1.0}, workers=1), root / "manifest.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        forget_tracking_uri(mp)
        client = MlflowClient()
        run = client.create_run(client.create_experiment(unique("drift-train")))
        client.log_artifact(run.info.run_id, str(manifest), "data")
        client.create_registered_model(name)
        tags = {"validation.manifest": f"runs:/{run.info.run_id}/data/manifest.csv"}
        version = client.create_model_version(name, f"{run.info.artifact_uri}/pyfunc", run.info.run_id, tags).version
        client.set_registered_model_alias(name, "champion", version)
    now = time.time()
    _log(root / "log", name, [p.read_bytes() for p in train], now - 3 * 3600)  # the training images: no drift
    _log(root / "log", name, _bright(25), now - 600)  # the line got brighter
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "tracking": {"registered_model": name, "experiment": name},
        "prediction_log": {"dir": str(root / "log")},
        "validate": {"manifest": str(root / "no-such-manifest.csv")},  # so the champion's must be the reference
        "drift": {"min_images": 10, "retrain_deployment": f"{STANDIN}/on-demand", "cron": "30 5 * * *"},
    }), encoding="utf-8")  # fmt: skip
    env = os.environ | {"PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server}
    log = open(root / "serve.log", "w")  # noqa: SIM115 - closed by stop_server
    proc = subprocess.Popen([sys.executable, "-m", "vitops", "--params", str(params), "serve"], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    proc.log = log  # type: ignore[attr-defined]
    yield {"root": root, "name": name, "version": version, "params": params, "env": env, "serve": proc,
           "mlflow": mlflow_server}  # fmt: skip
    stop_server(proc)


def _vitops(e: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vitops", "--params", str(e["params"]), *args]
    return subprocess.run(cmd, cwd=e["root"], env=e["env"], capture_output=True, text=True, timeout=300)


def _drift_runs(e: dict) -> dict[str, Any]:
    client = MlflowClient(e["mlflow"])
    experiment = client.get_experiment_by_name(e["name"]).experiment_id
    runs = client.search_runs([experiment], f"tags.`vitops.model` = '{e['name']}' AND tags.stage = 'drift'")
    return {r.info.run_id: r for r in runs}


def _artifact_keys(e: dict, flow_run_id: str) -> set[str]:
    found = _api(e["env"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"] for a in found}


def test_vitops_drift_records_no_drift_and_too_few(drift_env: dict) -> None:
    e = drift_env
    stable = _vitops(e, "drift", "--since", "4h", "--until", "2h")
    assert stable.returncode == 0, stable.stdout + stable.stderr
    assert "drift No drift: 30 kept image(s)" in stable.stdout
    assert f"the training manifest of {e['name']} version {e['version']} (champion)" in stable.stdout

    few = _vitops(e, "drift", "--since", "2000-01-01", "--until", "2000-01-02")
    assert few.returncode == 0, few.stdout + few.stderr
    assert "drift Too few images: 0 kept image(s)" in few.stdout and "drift.min_images=10: no verdict" in few.stdout

    runs = list(_drift_runs(e).values())
    verdicts = sorted(r.data.tags["vitops.drift.verdict"] for r in runs)
    assert verdicts == ["no-drift", "too-few-images"]
    checked = next(r for r in runs if r.data.tags["vitops.drift.verdict"] == "no-drift")
    assert checked.data.metrics["images"] == 30 and checked.data.metrics["kl_max"] <= 0.1
    assert {f"kl.{c}" for c in ("mean_r", "std_b")} <= set(checked.data.metrics)
    assert artifact_key(e["name"], "drift") in _artifact_keys(e, checked.data.tags["prefect.flow_run_id"])


def test_served_daily_deployment_with_retrain_on_drift_starts_the_retrain(drift_env: dict) -> None:
    e, env = drift_env, drift_env["env"]
    standin = _standin(env, "on-demand")
    deadline = time.monotonic() + 180
    while True:
        try:
            daily = _api(env, "/deployments/name/drift/daily")
            break
        except urllib.error.HTTPError:
            assert e["serve"].poll() is None and time.monotonic() < deadline, (e["root"] / "serve.log").read_text()
            time.sleep(2)
    assert [s["schedule"]["cron"] for s in daily["schedules"]] == ["30 5 * * *"]  # drift.cron of params.yaml

    started = _api(env, f"/deployments/{daily['id']}/create_flow_run",
                   {"parameters": {"since": "1h", "retrain_on_drift": True}})  # fmt: skip
    deadline = time.monotonic() + 300
    while (run := _api(env, f"/flow_runs/{started['id']}"))["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED"):
        assert time.monotonic() < deadline, f"drift run still {run['state']['name']}"
        time.sleep(2)
    assert run["state"]["name"] == "Drift detected", run["state"]
    message = run["state"]["message"]
    assert "25 kept image(s)" in message and "mean_r KL" in message and "event vitops.drift.detected" in message
    assert f"started {STANDIN}/on-demand" in message

    retrains = _runs_of(env, standin)
    assert len(retrains) == 1 and retrains[0]["state"]["type"] == "SCHEDULED"  # created, never run here
    assert "vitops-drift" in retrains[0]["tags"] and retrains[0]["id"] in message

    wanted = {
        "filter": {"event": {"name": ["vitops.drift.detected"]}, "resource": {"id": [f"vitops.model.{e['name']}"]}}
    }
    deadline = time.monotonic() + 60
    while not (events := _api(env, "/events/filter", wanted)["events"]):  # the server stores events asynchronously
        assert time.monotonic() < deadline, "no vitops.drift.detected event reached the server"
        time.sleep(1)
    assert "mean_r" in events[0]["payload"]["drifted"]
    drifted = [r for r in _drift_runs(e).values() if r.data.tags["prefect.flow_run_id"] == started["id"]]
    assert len(drifted) == 1 and drifted[0].data.tags["vitops.drift.verdict"] == "drift"
    assert drifted[0].data.metrics["kl.mean_r"] > 0.1
    assert artifact_key(e["name"], "drift") in _artifact_keys(e, started["id"])


def test_the_automation_of_the_docs_runs_the_retrain_on_the_event(drift_env: dict, tmp_path: Path) -> None:
    e, env = drift_env, drift_env["env"]
    standin = _standin(env, "by-automation")
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL) if "vitops.drift.detected" in b)
    automation = tmp_path / "retrain-on-drift.yaml"
    automation.write_text(block.replace("DEPLOYMENT_ID", standin), encoding="utf-8")
    created = subprocess.run([sys.executable, "-m", "prefect", "automation", "create", "--from-file", str(automation)],
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    automation_id = created.stdout.split("with id")[-1].split()[0].strip(".'\"")
    try:
        detected = _vitops(e, "drift", "--since", "1h")  # no --retrain: the automation acts on the event
        assert detected.returncode == 1 and "drift Drift detected" in detected.stdout, detected.stdout + detected.stderr
        deadline = time.monotonic() + 120
        while not _runs_of(env, standin):
            assert time.monotonic() < deadline, "the automation created no run of the retrain deployment"
            time.sleep(2)
    finally:
        _api(env, f"/automations/{automation_id}", method="DELETE")
