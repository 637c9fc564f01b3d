"""The retrain flow under Prefect's test harness, against a real MLflow server: gate pass, skip on unchanged
inputs, force with a KPI-gate failure, a data-gate failure; the named end states, the MLflow records grouped
under one parent run, the Prefect artifacts and the registry aliases."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.projects import make_project, set_params
from mlflow import MlflowClient

MODEL = "flow-digits"


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, harness: None) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("flow") / "project"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        params = make_project(root, MODEL)
        mp.chdir(root)
        yield params


def _run(params: Path, **kwargs):
    from vitops.flows.retrain import retrain

    return retrain(params_file=str(params), return_state=True, **kwargs)


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.integration
def test_pass_then_skip_then_force_with_a_failing_kpi_gate(project: Path, tracking: str) -> None:
    client = MlflowClient(tracking)
    state = _run(project)
    assert state.is_completed() and state.name == "Completed", state.message
    assert "KPI gate passed" in state.message and "alias candidate -> version 1" in state.message
    assert client.get_registered_model(MODEL).aliases == {"candidate": "1"}

    parent = client.search_runs(
        [client.get_experiment_by_name(MODEL).experiment_id], "tags.stage = 'retrain'", max_results=5
    )[0]
    tags = parent.data.tags
    assert tags["vitops.outcome"] == "passed" and tags["vitops.registered_version"] == "1"
    assert tags["vitops.data_version"].endswith(".dir") and tags["prefect.flow_run_id"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {"train-vit", "train-baseline", "bench"} <= {r.info.run_name for r in children}
    _check_records(client, tracking, parent, state)


def _check_records(client: MlflowClient, tracking: str, parent: Any, state: Any) -> None:
    """What people see of a passed retrain in MLflow's and Prefect's UIs (issue 24)."""
    from prefect.settings import PREFECT_UI_URL

    # the registry: one row per real model, the version described for people, tags for machines
    assert [m.name for m in client.search_registered_models(f"name LIKE '{MODEL}%'")] == [MODEL]
    version = client.get_model_version(MODEL, "1")
    text = version.description
    assert text.startswith("### KPI gate PASSED against the baseline") and "| KPI | candidate | reference |" in text
    assert "% CI " in text and "| engine served | onnxruntime" in text and "| data version | " in text
    assert "[KPI report](#/experiments/" in text and "/artifacts/gate/report.md)" in text
    here = f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert (
        f"[validation report]({here}/artifacts/data/" in text
        and f"[Data Docs]({here}/artifacts/data/data-docs/" in text
    )
    assert "[training run](#/experiments/" in text
    assert version.tags["gate.passed"] == "true" and version.run_id == parent.info.run_id  # listed on the run page
    # the retrain's run: KPIs, key parameters, the decision as its description, a working Prefect link
    run = client.get_run(parent.info.run_id)
    assert {"kpi.top1", "kpi.uplift_low", "kpi.latency_p95_ms", "kpi.monthly_tco"} <= set(run.data.metrics)
    assert {"train.lr", "train.model", "gate.max_p95_ms", "data_version", "code_version"} <= set(run.data.params)
    assert run.data.tags["mlflow.note.content"].startswith("### KPI gate PASSED")
    assert f"| registered | {MODEL} version 1 |" in run.data.tags["mlflow.note.content"]
    flow_run_id = state.state_details.flow_run_id
    assert run.data.tags["prefect.flow_run_url"] == f"{PREFECT_UI_URL.value()}/runs/flow-run/{flow_run_id}"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data/data-docs")} >= {"data/data-docs/index.html"}
    # Prefect: real links by the tracking server's URL, the KPI table without cut-off reasons, the stage logs
    base = f"{tracking}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert _artifacts("flow-digits-mlflow-run")[0].data.endswith(f"]({base})")  # stored as [text](link)
    assert _artifacts("flow-digits-data-docs")[0].data.endswith(f"]({base}/artifacts/data/data-docs/index.html)")
    assert _artifacts("flow-digits-registered-version")[0].data.endswith(f"]({tracking}/#/models/{MODEL}/versions/1)")
    assert {a.type for a in _artifacts("flow-digits-kpi-table")} == {"table"}
    assert "reason" not in _artifacts("flow-digits-kpi-table")[0].data
    decision = _artifacts("flow-digits-gate-decision")[0].data
    assert "KPI gate PASSED" in decision and f"[MLflow run]({base})" in decision and "PASS latency/p95_ms:" in decision
    logs = _logs(flow_run_id)
    assert any(log.name.startswith("vitops.") and log.level == logging.INFO for log in logs), logs
    assert any("registered flow-digits version 1" in log.message for log in logs)


def _logs(flow_run_id: Any) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the handler sends in batches
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    skipped = _run(project)
    assert skipped.name == "Skipped" and skipped.is_completed()
    assert "match the last successful retrain" in skipped.message and "force=true" in skipped.message
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1  # nothing retrained, nothing registered

    set_params(project, gate={"max_p95_ms": 1e-6})
    failed = _run(project, force=True)
    assert failed.is_failed() and failed.name == "KPI gate failed"
    assert "version 2" in failed.message and "registered without `candidate`" in failed.message
    assert "p95" in failed.message
    assert client.get_registered_model(MODEL).aliases == {"candidate": "1"}  # the failed version got no alias
    assert client.get_model_version(MODEL, "2").tags["gate.passed"] == "false"
    set_params(project, gate={"max_p95_ms": 1000.0})


@pytest.mark.integration
def test_vitops_retrain_says_skipped_and_exits_0(project: Path, tracking: str, capsys) -> None:
    from vitops.flows.cli import main

    assert main(["--params", str(project), "retrain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("retrain Skipped: skipped: data ") and "force=true" in out


@pytest.mark.integration
def test_the_terminal_keeps_prefects_info_lines_off_and_the_run_page_gets_them(project: Path, tracking: str) -> None:
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's API, seen by a fresh process
    cmd = [sys.executable, "-m", "vitops", "retrain", "--params", str(project)]  # --params after the subcommand
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=project.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("retrain Skipped: skipped: data ")
    assert "INFO" not in out.stderr and "Beginning flow run" not in out.stderr, out.stderr  # no library INFO noise
    with get_client(sync_client=True) as client:
        (last,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    assert last.state_name == "Skipped"
    assert any(log.message.startswith("skipped: data ") for log in _logs(last.id))  # the run page has it at INFO


@pytest.mark.integration
def test_a_failed_data_gate_ends_failed_with_its_reasons_and_trains_nothing(project: Path, tracking: str) -> None:
    client = MlflowClient(tracking)
    versions = len(client.search_model_versions(f"name='{MODEL}'"))
    broken = project.parent / "data" / "raw" / "3" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    try:
        state = _run(project, force=True)
    finally:
        broken.unlink()
    assert state.is_failed() and state.name == "Data gate failed"
    assert "data gate failed" in state.message and "report.json" in state.message
    parent = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id], "tags.stage = 'retrain'")[0]
    assert parent.data.tags["mlflow.note.content"].startswith("### Data gate FAILED: nothing trained")
    assert "broken.png" in parent.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "data/data-docs")} >= {
        "data/data-docs/index.html"
    }
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions
    assert client.get_registered_model(MODEL).aliases == {"candidate": "1"}


def test_transient_errors_are_retried_and_gates_are_not() -> None:
    from mlflow.exceptions import MlflowException

    from vitops.deploy.parity import ParityError
    from vitops.flows.retries import is_transient
    from vitops.flows.tracking import TrackingError

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise TrackingError("cannot reach MLflow tracking at http://mlflow:5000") from cause
    except TrackingError as err:
        assert is_transient(err)
    assert is_transient(MlflowException("API request failed: Max retries exceeded with url"))
    assert not is_transient(ParityError("parity gate failed: onnxruntime-int8"))
    assert not is_transient(ValueError("train.lr: -1 is not allowed"))


def test_shipped_deployments_match_params(repo_root: Path) -> None:
    import yaml

    from vitops.flows.config import load_params

    deployments = {d["name"]: d for d in yaml.safe_load((repo_root / "prefect.yaml").read_text())["deployments"]}
    params = load_params(repo_root / "params.yaml")
    nightly = deployments["nightly"]
    assert nightly["schedules"] == [{"cron": params.retrain.cron, "timezone": params.retrain.timezone}]
    assert nightly["concurrency_limit"]["limit"] == 1
    entrypoints = {"nightly": "flows/retrain.py:retrain", "on-demand": "flows/retrain.py:retrain",
                   "staged": "flows/pilot.py:pilot", "daily": "flows/drift.py:drift"}  # fmt: skip
    assert {name: d["entrypoint"] for name, d in deployments.items()} == entrypoints
    assert deployments["daily"]["schedules"] == [{"cron": params.drift.cron, "timezone": "UTC"}]
    assert all(d["work_pool"]["name"] == "vitops" for d in deployments.values())
    gpu = yaml.safe_load((repo_root / "prefect-gpu.yaml").read_text())["deployments"][0]
    assert gpu["entrypoint"] == "flows/retrain.py:retrain" and gpu["parameters"]["nproc_per_node"] > 1
