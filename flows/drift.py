"""The `drift` flow: are the line's images still like the ones the serving model was trained on?

    vitops drift [--since 24h]                                 # once, in this process
    prefect deployment run 'drift/daily'                       # the deployment `vitops serve` schedules on drift.cron
    prefect deployment run 'drift/daily' --param retrain_on_drift=true

It takes the images the endpoint kept in the prediction log (`prediction_log.dir`) over the last
`drift.since_hours`, scans them as the data gate scans a dataset, and compares their per-image channel statistics
with the champion's training manifest (the version's `validation.manifest` artifact; else this machine's
`validate.manifest`) with the drift suite of `data_checks` (KL divergence per statistic). Every run leaves an MLflow
run (`drift-<model>`: the KL numbers, the verdict, the scanned images' manifest) and a Prefect markdown artifact.

End states, all Completed unless the retrain could not be started: `No drift`, `Drift detected`, `Too few images`
(fewer than `drift.min_images` kept images: no verdict), `No reference` (no training manifest anywhere). A strong
drift (a KL divergence over `drift.kl_threshold`, else `validate.drift_kl_threshold`) emits the Prefect event
`vitops.drift.detected` (resource `vitops.model.<model>`), which an automation may act on, and, with
`drift.retrain_on_drift` or the parameter `retrain_on_drift=true`, runs the deployment `drift.retrain_deployment`
without waiting for it (docs/operations.md shows both ways).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from vitops.flows import registry, tracking
from vitops.flows.config import DEFAULT_PARAMS, load_params
from vitops.flows.records import artifact_key, stage_logs
from vitops.flows.retries import TRANSIENT
from vitops.flows.settings import run_context
from vitops.flows.tracking import RunContext

NO_DRIFT, DRIFT, TOO_FEW, NO_REFERENCE = "No drift", "Drift detected", "Too few images", "No reference"
RETRAIN_NOT_STARTED = "Retrain not started"
EVENT = "vitops.drift.detected"
_VERDICTS = {NO_DRIFT: "no-drift", DRIFT: "drift", TOO_FEW: "too-few-images", NO_REFERENCE: "no-reference"}


@dataclass
class DriftResult:
    """One drift check: the window, what was compared and what it found."""

    model: str
    since: float
    until: float
    images: int  # kept images of the window, one per sha256, readable
    reference: str  # where the training manifest came from
    threshold: float
    threshold_key: str  # the params.yaml key the threshold came from
    state: str = NO_DRIFT  # one of the end states above
    kl: dict[str, float] = field(default_factory=dict)  # statistic -> KL divergence against the training data
    warnings: list[str] = field(default_factory=list)

    @property
    def window(self) -> str:
        """E.g. `2026-12-04T06:00Z .. 2026-12-05T06:00Z`."""
        return f"{_stamp(self.since)} .. {_stamp(self.until)}"

    @property
    def drifted(self) -> list[str]:
        """The statistics whose divergence is over the threshold."""
        return [name for name, value in self.kl.items() if value > self.threshold]


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%MZ")


def logged_images(log_dir: Path, model: str, since: float, until: float) -> Any:
    """The kept images of `model`'s answers logged in [since, until), one row per sha256, scanned like a dataset's
    files (a manifest frame: channel statistics, size, error; label = the latest answer's, split `log`)."""
    import os

    import pandas as pd

    from vitops.data_checks.images import scan_files
    from vitops.data_checks.manifest import COLUMNS
    from vitops.deploy.prediction_log import image_path, read_predictions

    answers = read_predictions(log_dir, since, until, model=model)
    answers = answers[answers["status"] == "ok"].drop_duplicates("sha256", keep="last")
    root = os.path.realpath(log_dir)
    kept = {}
    for sha, label in zip(answers["sha256"], answers["label"], strict=True):
        path = image_path(log_dir, sha)
        if path is not None:
            kept[Path(os.path.realpath(path)).relative_to(root).as_posix()] = label
    rows = scan_files(root, sorted(kept))
    for row in rows:
        row["label"], row["split"] = kept[row["path"]], "log"
    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    return frame[frame["error"] == ""].reset_index(drop=True)


def training_manifest(name: str, local: Path, run: RunContext) -> tuple[Any, str]:
    """The champion's training manifest (its `validation.manifest` artifact), else `local`; (None, why) when
    neither can be read."""
    from vitops.data_checks.manifest import read_manifest

    why = ""
    try:
        run.configure()
        champion = registry.version_info(name, "champion")
        uri = champion.tags.get("validation.manifest")
        if uri:
            with tempfile.TemporaryDirectory(prefix="vitops-drift-") as tmp:
                path = tracking.download_artifact(uri, Path(tmp))
                return read_manifest(path), f"the training manifest of {name} version {champion.version} (champion)"
        why = f"version {champion.version} (champion) logged no training manifest"
    except (registry.RegistryError, tracking.TrackingError) as err:
        why = f"the champion of {name} cannot be read ({err})"
    if Path(local).is_file():
        return read_manifest(local), f"{local} (validate.manifest; {why})"
    return None, f"{why}, and {local} (validate.manifest) does not exist"


def compare(images: Any, reference: Any, result: DriftResult) -> DriftResult:
    """Fill `result` with the drift suite's KL divergence of each channel statistic against the reference."""
    from vitops.data_checks.gate import Runner, check_drift
    from vitops.data_checks.suite import GateRules

    rules = GateRules(drift_kl_threshold=result.threshold)
    advice = "the line's images differ from the training data (camera, lighting, parts); label some and run from-log"
    entries, warnings = check_drift(Runner(None), reference, images, rules, "the training data", advice, labels=False)
    result.kl = {e["column"]: float(e["observed"]) for e in entries if isinstance(e["observed"], int | float)}
    result.warnings = [w.replace("validate.drift_kl_threshold", result.threshold_key) for w in warnings]
    result.state = DRIFT if result.drifted else NO_DRIFT
    return result


def record(result: DriftResult, images: Any, run: RunContext, flow_run_id: str) -> str:
    """The check's MLflow run (metrics `kl.<statistic>`, `kl_max`, `images`; the verdict as a tag; the scanned
    images' manifest) and its Prefect markdown artifact; returns the MLflow run id."""
    from prefect.artifacts import create_markdown_artifact

    run.configure()
    tags = {"stage": "drift", "vitops.model": result.model, "vitops.drift.verdict": _VERDICTS[result.state],
            "vitops.drift.reference": result.reference, "prefect.flow_run_id": flow_run_id}  # fmt: skip
    with tracking.start_run(f"drift-{result.model}", tags=tags, parent_run_id=None) as handle:
        handle.log_params({"since": _stamp(result.since), "until": _stamp(result.until),
                           "threshold": result.threshold, "threshold_key": result.threshold_key})  # fmt: skip
        metrics = {"images": result.images, **{f"kl.{k}": v for k, v in result.kl.items()}}
        if result.kl:
            metrics["kl_max"] = max(result.kl.values())
        handle.log_metrics(metrics)
        handle.log_dict(asdict(result) | {"state": result.state, "drifted": result.drifted}, "drift/result.json")
        if images is not None and len(images):
            with tempfile.TemporaryDirectory(prefix="vitops-drift-") as tmp:
                images.to_csv(Path(tmp) / "logged_images.csv", index=False)
                handle.log_artifact(Path(tmp) / "logged_images.csv", artifact_path="drift")
        run_id = handle.run_id
    where = tracking.run_url(run_id) or tracking.local_ui_hint(run_id)
    create_markdown_artifact(_markdown(result, where), key=artifact_key(result.model, "drift"),
                             description=f"drift check: {result.state}")  # fmt: skip
    return run_id


def _markdown(result: DriftResult, url: str) -> str:
    lines = [f"## {result.model}: {result.state}", "",
             f"{result.images} kept image(s) logged {result.window}, against {result.reference}; strong drift above "
             f"KL {result.threshold:g} ({result.threshold_key}).", ""]  # fmt: skip
    if result.kl:
        lines += ["| statistic | KL divergence | over the threshold |", "| --- | ---: | --- |"]
        lines += [f"| {k} | {v:.4g} | {'yes' if v > result.threshold else ''} |" for k, v in result.kl.items()]
    link = f"[MLflow run]({url})" if url.startswith("http") else f"MLflow: {url}"
    return "\n".join([*lines, "", link])


def emit_detected(result: DriftResult, mlflow_run: str) -> None:
    """The Prefect event `vitops.drift.detected` on the resource `vitops.model.<model>`."""
    from prefect.events import emit_event

    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"vitops.model.{result.model}", "prefect.resource.name": result.model},
        payload={"kl": result.kl, "drifted": result.drifted, "threshold": result.threshold,
                 "images": result.images, "window": result.window, "mlflow_run_id": mlflow_run},
    )  # fmt: skip


@task(cache_policy=NO_CACHE)
def images_task(log_dir: Path, model: str, since: float, until: float) -> Any:
    """The kept images of the window, scanned."""
    return logged_images(log_dir, model, since, until)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def reference_task(name: str, local: Path, run: RunContext) -> tuple[Any, str]:
    """The champion's training manifest, else this machine's."""
    return training_manifest(name, local, run)


@task(cache_policy=NO_CACHE)
def compare_task(images: Any, reference: Any, result: DriftResult) -> DriftResult:
    """KL divergence of each channel statistic against the training data."""
    return compare(images, reference, result)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def record_task(result: DriftResult, images: Any, run: RunContext, flow_run_id: str) -> str:
    """The MLflow run and the Prefect artifact of the check."""
    return record(result, images, run, flow_run_id)


@flow(name="drift", retries=0, log_prints=True)
@stage_logs()  # the stages' own INFO lines on the run page
def drift(
    model_name: str | None = None,
    since: str | None = None,
    until: str | None = None,
    params_file: str = str(DEFAULT_PARAMS),
    retrain_on_drift: bool = False,
) -> Any:
    """Compare the line's kept images with the champion's training data; record the verdict.

    Args:
        model_name: registered model (default: tracking.registered_model).
        since: start of the window: 2026-12-04, 2026-12-04T06:00, 24h, 7d (default: drift.since_hours ago).
        until: end of the window (default: now).
        params_file: params.yaml to read (relative to the working directory of the run).
        retrain_on_drift: on a strong drift, run the deployment drift.retrain_deployment (as does
            drift.retrain_on_drift: true).
    """
    from prefect.runtime import flow_run

    from vitops.deploy.prediction_log import parse_time

    params = load_params(params_file, must_exist=params_file != str(DEFAULT_PARAMS))
    name, settings = model_name or params.tracking.registered_model, params.drift
    end = parse_time(until) if until else time.time()
    start = parse_time(since) if since else end - settings.since_hours * 3600
    key = "drift.kl_threshold" if settings.kl_threshold else "validate.drift_kl_threshold"
    threshold = settings.kl_threshold or params.validate_.drift_kl_threshold
    run, run_id = run_context(params), str(flow_run.id or "")
    result = DriftResult(name, start, end, 0, "", threshold, key)

    images = images_task(Path(params.prediction_log.dir), name, start, end)
    result.images = len(images)
    if result.images < settings.min_images:
        result.state, result.reference = TOO_FEW, "not read"
        record_task(result, images, run, run_id)
        message = (
            f"{result.images} kept image(s) of {name} logged {result.window} in {params.prediction_log.dir}, fewer "
            f"than drift.min_images={settings.min_images}: no verdict"
        )
        return Completed(name=TOO_FEW, message=message)
    reference, result.reference = reference_task(name, Path(params.validate_.manifest), run)
    if reference is None:
        result.state = NO_REFERENCE
        record_task(result, images, run, run_id)
        return Completed(name=NO_REFERENCE, message=f"no training manifest to compare with: {result.reference}")
    result = compare_task(images, reference, result)
    mlflow_run = record_task(result, images, run, run_id)
    head = f"{result.images} kept image(s) of {name} logged {result.window} against {result.reference}"
    if result.state == NO_DRIFT:
        top = max(result.kl.values(), default=0.0)
        return Completed(name=NO_DRIFT, message=f"{head}: largest KL {top:.3g} <= {threshold:g} ({key})")
    emit_detected(result, mlflow_run)
    found = ", ".join(f"{k} KL {result.kl[k]:.3g}" for k in result.drifted)
    message = f"{head}: {found} over {threshold:g} ({key}); event {EVENT} emitted; MLflow run {mlflow_run}"
    if retrain_on_drift or settings.retrain_on_drift:
        started = _run_retrain(settings.retrain_deployment)
        if started.startswith("cannot"):
            return Failed(name=RETRAIN_NOT_STARTED, message=f"{message}; {started}")
        message += f"; {started}"
    return Completed(name=DRIFT, message=message)


def _run_retrain(deployment: str) -> str:
    """Start a run of the deployment without waiting for it; what happened, in words."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        started = run_deployment(name=deployment, timeout=0, tags=["vitops-drift"])
    except ObjectNotFound:
        return (f"cannot run deployment {deployment!r}: it does not exist on this Prefect server; serve it "
                "(`vitops serve`) or set drift.retrain_deployment")  # fmt: skip
    return f"started {deployment} (flow run {started.id})"
