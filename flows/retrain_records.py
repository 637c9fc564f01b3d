"""What a retrain leaves behind for the next one and for people: the outcome on its MLflow run (read back by
the skip decision on any machine) and its Prefect artifacts (the KPI table, the gate decision, links)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

OUTCOME_TAG = "vitops.outcome"
INPUT_TAGS = ("data_version", "params_hash", "code_version")


def last_success(model: str) -> dict[str, Any] | None:
    """The newest retrain of `model` whose gate passed: its run id, registered version and recorded inputs."""
    from vitops.flows import tracking

    runs = tracking.find_runs(
        f"tags.`vitops.model` = '{model}' AND tags.`{OUTCOME_TAG}` = 'passed' AND attributes.status = 'FINISHED'"
    )
    if not runs:
        return None
    tags = runs[0]["tags"]
    return {
        "run_id": runs[0]["run_id"],
        "version": tags.get("vitops.registered_version"),
        "inputs": {key: tags.get(f"vitops.{key}") for key in INPUT_TAGS},
    }


def record_outcome(run: Any, outcome: str, version: str | None) -> None:
    """Tag the retrain's parent run with how it ended (passed, kpi-gate-failed, data-gate-failed)."""
    run.set_tags({OUTCOME_TAG: outcome, "vitops.registered_version": version or "none"})


def artifact_key(model: str, what: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model}-{what}".lower()).strip("-")


def mlflow_run_url(run_id: str) -> str:
    """A link to the run in the MLflow UI, or the command that opens the UI on a local store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    run = mlflow.get_run(run_id)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  (then experiment {run.info.experiment_id}, run {run_id})"


def publish_artifacts(model: str, run_id: str, gate: Any, registered: Any, checked: Any) -> None:
    """The KPI table, the gate decision and links to the MLflow run, the version and the Data Docs."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    url = mlflow_run_url(run_id)
    if url.startswith("http"):
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key=artifact_key(model, "mlflow-run"))
    docs = Path(checked.data_docs) if checked is not None else None
    if docs is not None and docs.is_file():
        create_link_artifact(docs.resolve().as_uri(), link_text="Great Expectations Data Docs",
                             key=artifact_key(model, "data-docs"))  # fmt: skip
    if gate is None:
        create_markdown_artifact(
            "## Data gate failed\n\n" + "\n".join(f"- {f}" for f in checked.failures),
            key=artifact_key(model, "gate-decision"),
            description="the data gate's failures",
        )
        return
    rows = [
        {"kpi": c.kpi, "check": c.name, "value": round(c.value, 6), "threshold": round(c.threshold, 6),
         "verdict": "PASS" if c.passed else "FAIL", "reason": c.reason}
        for c in gate.decision.checks
    ]  # fmt: skip
    create_table_artifact(rows, key=artifact_key(model, "kpi-table"), description=f"KPIs against {gate.reference_kind}")
    version = registered.version
    alias = "alias `candidate` moved to it" if registered.candidate else "no alias: the gate failed"
    lines = [
        f"## {model} version {version}: KPI gate {'passed' if gate.passed else 'FAILED'}",
        "",
        f"{gate.decision.summary()}; {alias}.",
        "",
        *[f"- {line}" for line in gate.decision.reasons()],
        "",
        f"MLflow run: {url}",
        f"Report: {gate.report[0]}",
    ]
    create_markdown_artifact("\n".join(lines), key=artifact_key(model, "gate-decision"), description="gate decision")
    if url.startswith("http"):
        base = url.split("/#/")[0]
        create_link_artifact(f"{base}/#/models/{model}/versions/{version}", link_text=f"{model} version {version}",
                             key=artifact_key(model, "registered-version"))  # fmt: skip
