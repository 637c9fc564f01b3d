"""What each pilot stage leaves behind: an MLflow run naming both versions (metrics, report, predictions), the
stage's record on the candidate version's tags (read back by `promote`), and Prefect artifacts for the run page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitops.flows.retrain_records import artifact_key, mlflow_run_url

STAGE_TAG, OUTCOME_TAG = "vitops.pilot.stage", "vitops.pilot.outcome"


def stage_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a stage's summary as flat MLflow metrics (`candidate.top1`, `agreement`, ...)."""
    metrics: dict[str, float] = {}
    for role, m in summary.get("measures", {}).items():
        acc = m["accuracy"]
        values = {
            "images": m["images"], "labelled": acc["n"], "top1": acc["top1"], "top1_low": acc["low"],
            "top1_high": acc["high"], "p50_ms": m["p50_ms"], "p95_ms": m["p95_ms"],
        }  # fmt: skip
        metrics |= {f"{role}.{k}": float(v) for k, v in values.items() if v is not None}
    if summary.get("agreement") is not None:
        metrics["agreement"] = float(summary["agreement"])
        metrics["disagreements"] = float(len(summary.get("disagreements", [])))
    if summary.get("uplift"):
        metrics["uplift_points"] = float(summary["uplift"]["points"])
    counts = summary.get("counts", {})
    for key in ("files", "usable", "rejected", "labelled", "unlabelled"):
        if key in counts:
            metrics[f"batch.{key}"] = float(counts[key])
    return metrics


def record_stage(
    params: Any,
    stage: str,
    versions: Any,
    outcome: str,
    flow_run_id: str,
    summary: dict[str, Any] | None = None,
    files: list[Path] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one stage of a pilot as an MLflow run; its id."""
    from vitops.flows import tracking

    tracking.configure(params.tracking.uri, params.tracking.experiment)
    run_tags = {
        "stage": f"pilot-{stage}",
        "vitops.model": versions.name,
        STAGE_TAG: stage,
        OUTCOME_TAG: outcome,
        "vitops.pilot.candidate_version": versions.candidate,
        "vitops.pilot.champion_version": versions.champion or "none",
        "prefect.flow_run_id": flow_run_id,
        **(tags or {}),
    }
    name = f"pilot-{stage}-{versions.name}-v{versions.candidate}"
    with tracking.start_run(name, tags=run_tags, parent_run_id=None) as run:
        if summary:
            run.log_metrics(stage_metrics(summary))
        for path in files or []:
            if Path(path).is_file():
                run.log_artifact(path, artifact_path=f"pilot-{stage}")
        return run.run_id


def publish(stage: str, versions: Any, run_id: str, headline: str, report: Path | None, summary: dict | None) -> None:
    """Prefect artifacts of a stage: the report (or the headline), the per-model table, the MLflow run link."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    name = versions.name
    body = report.read_text(encoding="utf-8") if report is not None and report.is_file() else ""
    create_markdown_artifact(
        f"## {headline}\n\n{body}", key=artifact_key(name, f"pilot-{stage}"), description=f"pilot {stage}"
    )
    if summary and summary.get("measures"):
        rows = [
            {"model": role, "version": m["version"], "engine": m["engine"], "images": m["images"],
             "top1_on_labelled": m["accuracy_text"], "p50_ms": m["p50_ms"], "p95_ms": m["p95_ms"]}
            for role, m in summary["measures"].items()
        ]  # fmt: skip
        create_table_artifact(rows, key=artifact_key(name, f"pilot-{stage}-models"), description=f"pilot {stage}")
    url = mlflow_run_url(run_id)
    if url.startswith("http"):
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key=artifact_key(name, f"pilot-{stage}-run"))
