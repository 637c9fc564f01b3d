"""What a retrain and a pilot leave behind for the next run and for people.

- A retrain: its outcome, KPI metrics and description on its MLflow run (the outcome is read back by the skip
  decision on any machine), the data gate's Data Docs as an artifact of that run, and its Prefect artifacts (the
  KPI table, the gate decision, links to the MLflow run, the version and the Data Docs by the tracking server's
  URL); `stage_logs` sends the vitops loggers' records to the Prefect run page.
- A pilot stage: an MLflow run naming both versions (metrics, report, predictions), the stage's record on the
  candidate version's tags (read back by `promote`), and Prefect artifacts for the run page; and the stage the
  version is piloted in (`pilot.stage`, `pilot.canary_fraction`, `pilot.stage_since`), which the endpoints read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitops.common.files import utc_now
from vitops.flows import registry, summaries, tracking

if TYPE_CHECKING:
    from vitops.flows.pilot_batch import StageResult, Versions

OUTCOME_TAG = "vitops.outcome"
DATA_DOCS = "data/data-docs/index.html"  # the Data Docs site's index, an artifact of the run that validated
INPUT_TAGS = ("data_version", "params_hash", "code_version")
# Tags of a pilot stage's MLflow run.
PILOT_STAGE_TAG, PILOT_OUTCOME_TAG = "vitops.pilot.stage", "vitops.pilot.outcome"
# Version tags the pilot writes (and `promote` reads back).
TAG_SHADOW_RUN, TAG_SHADOW_TIME = "pilot.shadow.run_id", "pilot.shadow.time"
TAG_CANARY_RUN, TAG_CANARY_OUTCOME = "pilot.canary.run_id", "pilot.canary.outcome"
TAG_CANARY_REASONS = "pilot.canary.reasons"
# The stage a version is piloted in, which the endpoints read on the holder of `pilot`: `shadow` or `canary`
# pilots it; `ended` (promoted, rolled back, replaced) and `stopped` (a guardrail breach) do not.
TAG_STAGE, TAG_STAGE_FRACTION, TAG_STAGE_SINCE = "pilot.stage", "pilot.canary_fraction", "pilot.stage_since"
STAGE_ENDED, STAGE_STOPPED = "ended", "stopped"


def artifact_key(model: str, what: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model}-{what}".lower()).strip("-")


# -- a retrain ---------------------------------------------------------------------------------------------------


def last_success(model: str) -> dict[str, Any] | None:
    """The newest retrain of `model` whose gate passed: its run id, registered version and recorded inputs."""
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


def record_outcome(run: Any, outcome: str, version: str | None, metrics: dict[str, float] | None = None) -> None:
    """Tag the retrain's parent run with how it ended (passed, kpi-gate-failed, data-gate-failed, ...) and log the
    gate's KPI metrics on it."""
    run.set_tags({OUTCOME_TAG: outcome, "vitops.registered_version": version or "none"})
    if metrics:
        run.log_metrics(metrics)


def keep_data_docs(run: Any, report: Path) -> str | None:
    """Log the Data Docs site beside the data gate's `report` (`<report folder>/data_docs/`) into the run, so its
    link works from any machine; its index's artifact path (`DATA_DOCS`), or None when there is no site."""
    site = Path(report).parent / "data_docs"
    if not (site / "index.html").is_file():
        return None
    run.log_artifact(site, artifact_path=str(Path(DATA_DOCS).parent))
    return DATA_DOCS


def record_data_gate_failure(run: Any, checked: Any) -> None:
    """The parent run of a retrain whose data gate said no: the report and the Data Docs, the failures as its
    description."""
    links = {}
    if Path(checked.report_path).is_file():
        run.log_artifact(checked.report_path, artifact_path="data")
        links["validation report"] = tracking.run_link(run.run_id, f"data/{Path(checked.report_path).name}")
    docs = keep_data_docs(run, checked.report_path)
    links["Data Docs"] = tracking.run_link(run.run_id, docs) if docs else ""
    run.set_description(summaries.data_gate_markdown(checked.failures, links, checked.rejected))


@contextlib.contextmanager
def stage_logs(level: int = logging.INFO) -> Iterator[None]:
    """While a flow runs, send the records of the vitops loggers (the stages') at `level` and above to its run
    page through Prefect's API log handler; the terminal's handlers and levels stay as they are."""
    from prefect.logging.handlers import APILogHandler

    logger, handler = logging.getLogger("vitops"), APILogHandler(level=level)
    before = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)  # the terminal's handlers filter by their own levels
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def publish_artifacts(model: str, run_id: str, gate: Any, registered: Any, checked: Any) -> None:
    """The KPI table, the gate decision and links to the MLflow run, the version and the Data Docs (by the tracking
    server's URL; a local store has none, and the decision says where to look instead)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    run_url = tracking.run_url(run_id)
    if run_url:
        create_link_artifact(run_url, link_text=f"MLflow run {run_id}", key=artifact_key(model, "mlflow-run"))
    docs_url = tracking.run_url(run_id, DATA_DOCS)
    if docs_url and checked is not None and Path(checked.data_docs).is_file():
        create_link_artifact(docs_url, link_text="Great Expectations Data Docs", key=artifact_key(model, "data-docs"))
    where = "" if run_url else f"MLflow: {tracking.local_ui_hint(run_id)}"
    if gate is None:
        links = {"MLflow run": run_url or "", "Data Docs": docs_url or ""}
        lines = [summaries.data_gate_markdown(checked.failures, links, checked.rejected)]
        create_markdown_artifact("\n".join([*lines, where]), key=artifact_key(model, "gate-decision"),
                                 description="the data gate's failures")  # fmt: skip
        return
    rows = [
        {
            "kpi": c.kpi,
            "check": c.name,
            "value": round(c.value, 6),
            "threshold": round(c.threshold, 6),
            "verdict": "PASS" if c.passed else "FAIL",
        }
        for c in gate.decision.checks
    ]  # fmt: skip; the reasons, too long for a table cell, are in full in the gate decision
    create_table_artifact(rows, key=artifact_key(model, "kpi-table"), description=f"KPIs against {gate.reference_kind}")
    version_url = tracking.ui_url(f"#/models/{model}/versions/{registered.version}")
    links = {"MLflow run": run_url} | {title: tracking.ui_url(link) for title, link in registered.links.items() if link}
    decision = json.loads(Path(gate.decision_file).read_text(encoding="utf-8"))
    text = summaries.gate_markdown(decision, registered.facts, {"version": version_url, **links})
    create_markdown_artifact("\n".join([text, where]), key=artifact_key(model, "gate-decision"),
                             description="gate decision")  # fmt: skip
    if version_url:
        create_link_artifact(version_url, link_text=f"{model} version {registered.version}",
                             key=artifact_key(model, "registered-version"))  # fmt: skip


# -- a pilot stage -----------------------------------------------------------------------------------------------


def record_pilot_stage(
    stage: str,
    versions: Versions,
    outcome: str,
    flow_run_id: str,
    headline: str,
    result: StageResult | None = None,
    files: list[Path] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Leave a pilot stage's records: its MLflow run (in the experiment `tracking.configure` selected) and its
    Prefect artifacts. A scoring stage gives its `result`; a stage that scored nothing gives the `files` to keep.

    Returns:
        The MLflow run id.
    """
    summary = result.summary if result is not None else None
    paths = result.files if result is not None else files
    mlflow_run = log_pilot_run(stage, versions, outcome, flow_run_id, summary, paths, tags)
    report = result.files[0] if result is not None else None
    publish_pilot_artifacts(stage, versions.name, mlflow_run, headline, report, summary)
    return mlflow_run


def pilot_metrics(summary: dict[str, Any]) -> dict[str, float]:
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
    logged = summary.get("log", {})  # a stage whose evidence is the prediction log
    for key in ("records", "errors", "images", "labelled"):
        if key in logged:
            metrics[f"log.{key}"] = float(logged[key])
    return metrics


def log_pilot_run(
    stage: str,
    versions: Versions,
    outcome: str,
    flow_run_id: str,
    summary: dict[str, Any] | None = None,
    files: list[Path] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one stage of a pilot as an MLflow run; its id."""
    run_tags = {
        "stage": f"pilot-{stage}",
        "vitops.model": versions.name,
        PILOT_STAGE_TAG: stage,
        PILOT_OUTCOME_TAG: outcome,
        "vitops.pilot.candidate_version": versions.candidate,
        "vitops.pilot.champion_version": versions.champion or "none",
        "prefect.flow_run_id": flow_run_id,
        **(tags or {}),
    }
    name = f"pilot-{stage}-{versions.name}-v{versions.candidate}"
    with tracking.start_run(name, tags=run_tags, parent_run_id=None) as run:
        if summary:
            run.log_metrics(pilot_metrics(summary))
        for path in files or []:
            if Path(path).is_file():
                run.log_artifact(path, artifact_path=f"pilot-{stage}")
        return run.run_id


def publish_pilot_artifacts(
    stage: str, model: str, run_id: str, headline: str, report: Path | None, summary: dict | None
) -> None:
    """Prefect artifacts of a stage: the report (or the headline), the per-model table, the MLflow run link."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    body = report.read_text(encoding="utf-8") if report is not None and report.is_file() else ""
    create_markdown_artifact(
        f"## {headline}\n\n{body}", key=artifact_key(model, f"pilot-{stage}"), description=f"pilot {stage}"
    )
    if summary and summary.get("measures"):
        rows = [
            {"model": role, "version": m["version"], "engine": m["engine"], "images": m["images"],
             "top1_on_labelled": m["accuracy_text"], "p50_ms": m["p50_ms"], "p95_ms": m["p95_ms"]}
            for role, m in summary["measures"].items()
        ]  # fmt: skip
        create_table_artifact(rows, key=artifact_key(model, f"pilot-{stage}-models"), description=f"pilot {stage}")
    url = tracking.run_url(run_id)
    if url:
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key=artifact_key(model, f"pilot-{stage}-run"))


def tag_shadow(versions: Versions, mlflow_run: str, agreement: float | None) -> None:
    """The shadow's record on the candidate version: its MLflow run, when, and the agreement with the champion."""
    registry.set_version_tags(versions.name, versions.candidate, {
        TAG_SHADOW_RUN: mlflow_run, TAG_SHADOW_TIME: utc_now(),
        "pilot.shadow.agreement": "none" if agreement is None else f"{agreement:.6f}",
    })  # fmt: skip


def tag_canary(versions: Versions, mlflow_run: str, verdict: str, failed: list[str]) -> None:
    """The canary's record on the candidate version: its MLflow run, the verdict and the guardrails that failed."""
    registry.set_version_tags(versions.name, versions.candidate, {
        TAG_CANARY_RUN: mlflow_run, TAG_CANARY_OUTCOME: verdict,
        TAG_CANARY_REASONS: " ".join(failed) or "all guardrails held",
        "pilot.canary.time": utc_now(),
    })  # fmt: skip


def tag_stage(name: str, version: str, stage: str, fraction: float | None = None, since: str | None = None) -> str:
    """Record the stage a version is piloted in (`shadow`, `canary`, `ended`, `stopped`), which the endpoints read
    on the holder of `pilot`, with the canary's share and since when.

    Args:
        name: the registered model.
        version: the version.
        stage: the stage.
        fraction: the canary's share of requests (`pilot.canary_fraction`), for a canary.
        since: keep this start (ISO UTC) instead of now: a stage that goes on keeps its evidence window.

    Returns:
        The stage's start as recorded (ISO 8601 UTC, to the millisecond).
    """
    since = since or datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    tags = {TAG_STAGE_SINCE: since}
    if fraction is not None:
        tags[TAG_STAGE_FRACTION] = f"{fraction:g}"
    # the stage goes last: an endpoint that reads the tags between two writes must not start a canary at the
    # fraction or window of the stage before
    registry.set_version_tags(name, version, tags | {TAG_STAGE: stage})
    return since


def tag_rolled_back(name: str, version: str, reason: str) -> None:
    """Mark the version a rollback took `champion` from, with when and why."""
    registry.set_version_tags(name, version, {"pilot.rolled_back": f"{utc_now()}: {reason}"})
