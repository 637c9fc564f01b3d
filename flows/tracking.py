"""One of the two modules that talk to MLflow: runs, metrics, artifacts, downloads and MLflow's threshold
validation (`flows/registry.py` is the other: versions, aliases and their history).

Everything else in vitops calls these functions, never `mlflow` directly. The tracking server is
`MLFLOW_TRACKING_URI` when set, else `tracking.uri` from params.yaml (a local SQLite file by default,
so one machine needs no server). Models are registered as a folder of plain files (safetensors weights
plus JSON metadata) so that `mlflow:models:/<name>@<alias>` sources resolve to a local file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.flows.connection import DEFAULT_TIMEOUT_S, bound_mlflow_retries, check_mlflow, connect_timeout

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """MLflow could not do what was asked; the message says which server, run or model."""


def tracking_uri(default: str) -> str:
    """The tracking URI in effect: the environment's `MLFLOW_TRACKING_URI`, else `default`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def configure(uri: str, experiment: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Point MLflow at `uri` (unless the environment overrides it) and select `experiment`, after checking that a
    tracking server answers within `timeout_s` and takes the environment's credentials (`flows/connection.py`).

    Returns:
        The tracking URI in effect.

    Raises:
        ServerUnreachable, CredentialsRefused: the server is down, or refuses the credentials.
    """
    import mlflow

    global _experiment_id
    # MLflow prints "View run ... at URL" for every run it ends; vitops prints the run ids it made itself.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in logs
    uri = tracking_uri(uri)
    timeout_s = connect_timeout(timeout_s)
    bound_mlflow_retries(timeout_s)
    check_mlflow(uri, timeout_s)
    mlflow.set_tracking_uri(uri)
    try:
        _experiment_id = mlflow.set_experiment(experiment).experiment_id
    except Exception as err:  # MLflow raises several client and connection errors here
        raise TrackingError(f"cannot reach MLflow tracking at {uri}: {err}") from err
    return uri


_experiment_id: str | None = None  # set by `configure`; runs are created in it


@dataclass(frozen=True)
class RunContext:
    """Where a stage logs: the tracking server and experiment (`MLFLOW_TRACKING_URI` wins over `uri`), and the
    run its records go under (a retrain's parent run), passed down as an argument."""

    uri: str
    experiment: str
    parent_run_id: str | None = None
    connect_timeout_s: float = DEFAULT_TIMEOUT_S

    def configure(self) -> str:
        """Point MLflow at this context's server and experiment; the tracking URI in effect."""
        return configure(self.uri, self.experiment, self.connect_timeout_s)


@dataclass
class RunHandle:
    """One MLflow run; everything logged through it goes to `run_id`, whatever run is active in the process.

    It talks to the server through `MlflowClient` with the run id, never through MLflow's active-run state,
    so handles work side by side and inside an outer run (a flow's).
    """

    run_id: str
    artifact_uri: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat parameters (values are stringified; long values are truncated)."""
        from mlflow.entities import Param

        self._batch(params=[Param(k, _short(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics; non-finite and non-numeric values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        self._batch(metrics=clean)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        from mlflow.entities import RunTag

        self._batch(tags=[RunTag(k, _short(v, 5000)) for k, v in tags.items()])

    def set_description(self, markdown: str) -> None:
        """The run's description (Markdown, shown at the top of its page in the MLflow UI)."""
        from mlflow.entities import RunTag

        self._batch(tags=[RunTag("mlflow.note.content", _short(markdown, 8000))])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload one file or a whole folder."""
        from mlflow import MlflowClient

        path = Path(path)
        if path.is_dir():
            MlflowClient().log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            MlflowClient().log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store a JSON or YAML document as an artifact."""
        from mlflow import MlflowClient

        MlflowClient().log_dict(self.run_id, dict(data), artifact_file)

    def _batch(self, **entries: Any) -> None:
        from mlflow import MlflowClient

        # The server takes at most 1000 metrics / 100 params / 100 tags per call.
        for key, limit in (("metrics", 1000), ("params", 100), ("tags", 100)):
            items = entries.get(key) or []
            for i in range(0, len(items), limit):
                MlflowClient().log_batch(self.run_id, **{key: items[i : i + limit]})


def _experiment() -> str:
    if _experiment_id is None:
        raise TrackingError("MLflow is not configured: call flows.tracking.configure(uri, experiment) first")
    return _experiment_id


@contextlib.contextmanager
def _running(run_id: str, artifact_uri: str, end: bool = True) -> Iterator[RunHandle]:
    """Yield a handle; at the end mark the run FINISHED, FAILED (exception) or KILLED (interrupt)."""
    from mlflow import MlflowClient

    status = "FINISHED"
    try:
        yield RunHandle(run_id=run_id, artifact_uri=artifact_uri)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if end:
            MlflowClient().set_terminated(run_id, status)


@contextlib.contextmanager
def start_run(
    run_name: str, tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None
) -> Iterator[RunHandle]:
    """Open a new run in the configured experiment; it ends FAILED if the body raises.

    Args:
        run_name: shown in the MLflow UI.
        tags: string tags.
        parent_run_id: make it a child of this run; by default the child of the run already active in this
            process through MLflow's fluent API, if any.
    """
    import mlflow
    from mlflow import MlflowClient

    tags = {k: str(v) for k, v in (tags or {}).items()}
    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active else None)
    if parent:
        tags["mlflow.parentRunId"] = parent
    try:
        run = MlflowClient().create_run(_experiment(), run_name=run_name, tags=tags)
    except TrackingError:
        raise
    except Exception as err:  # connection and permission errors alike
        raise TrackingError(f"cannot open an MLflow run at {mlflow.get_tracking_uri()}: {err}") from err
    with _running(run.info.run_id, run.info.artifact_uri) as handle:
        yield handle


def epoch_logger(handle: RunHandle) -> Callable[[int, Mapping[str, float]], None]:
    """A training-loop callback `(epoch, metrics)` that logs the metrics at step `epoch`."""

    def _log(epoch: int, metrics: Mapping[str, float]) -> None:
        handle.log_metrics(metrics, step=epoch)

    return _log


def download_model(model_uri: str, dst: Path) -> Path:
    """Download a registered model (`models:/<name>@<alias>` or `models:/<name>/<version>`) and return the vitops
    model folder in it (model.json + weights.safetensors; inside the pyfunc model's artifacts for versions that
    `vitops register` made).

    Raises:
        TrackingError: if the model, alias or server cannot be found, or the version holds no model folder.
    """
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except Exception as err:  # MlflowException, connection and permission errors alike
        raise TrackingError(
            f"cannot download {model_uri} from MLflow at {mlflow.get_tracking_uri()}: {err}. "
            "Check the model name and alias with `vitops history NAME` or the MLflow UI."
        ) from err
    for meta in sorted(local.rglob("model.json")):
        if (meta.parent / "weights.safetensors").is_file():
            return meta.parent
    raise TrackingError(f"{model_uri}: holds no vitops model folder (model.json + weights.safetensors)")


def download_artifact(artifact_uri: str, dst: Path) -> Path:
    """Download one artifact (`runs:/<run>/<path>` or a full artifact URI) into `dst`; its local path.

    Raises:
        TrackingError: the artifact or the store cannot be reached.
    """
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except Exception as err:  # MlflowException, connection and permission errors alike
        where = mlflow.get_tracking_uri()
        raise TrackingError(f"cannot download {artifact_uri} from MLflow at {where}: {err}") from err


def run_link(run_id: str, artifact: str | None = None) -> str:
    """The run's page (or one of its artifacts) in the MLflow UI, relative (`#/experiments/...`): a description
    that holds it links right on whatever host serves the UI."""
    from mlflow import MlflowClient

    experiment = MlflowClient().get_run(run_id).info.experiment_id
    return f"#/experiments/{experiment}/runs/{run_id}" + (f"/artifacts/{artifact}" if artifact else "")


def ui_url(link: str) -> str | None:
    """An MLflow UI link (`run_link`, `#/models/...`) made absolute by the tracking server's URL; None when the
    tracking URI is no HTTP server (a local store has no UI to link to)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    return f"{uri.rstrip('/')}/{link}" if uri.startswith(("http://", "https://")) else None


def run_url(run_id: str, artifact: str | None = None) -> str | None:
    """The absolute URL of the run (or one of its artifacts) in the MLflow UI, or None on a local store."""
    return ui_url(run_link(run_id, artifact))


def local_ui_hint(run_id: str) -> str:
    """Where a run on a local store is seen: the command that serves the UI, and the run id."""
    import mlflow

    return f"run `{run_id}` on the local store: `mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}`"


def find_runs(filter_string: str, max_results: int = 1) -> list[dict[str, Any]]:
    """Runs of the configured experiment matching an MLflow search filter, newest first, as plain dicts."""
    from mlflow import MlflowClient

    try:
        runs = MlflowClient().search_runs(
            [_experiment()],
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            max_results=max_results,
        )
    except TrackingError:
        raise
    except Exception as err:  # connection and permission errors alike
        raise TrackingError(f"cannot search MLflow runs: {err}") from err
    return [{"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)} for r in runs]


def threshold_verdicts(values: Mapping[str, float], thresholds: Mapping[str, tuple[float, bool]]) -> dict[str, bool]:
    """Whether each value clears its threshold, by MLflow's `validate_evaluation_results` with `MetricThreshold`.

    Args:
        values: metric name -> the candidate's value.
        thresholds: metric name -> (threshold, greater_is_better).

    Returns:
        metric name -> passed. Each metric is validated on its own, so one failure does not hide another.
    """
    verdicts = {}
    quiet = logging.getLogger("mlflow.models.evaluation.validation")  # logs INFO lines on every call
    level, quiet.level = quiet.level, logging.WARNING
    try:
        for name, (threshold, greater_is_better) in thresholds.items():
            verdicts[name] = _clears(name, float(values[name]), float(threshold), greater_is_better)
    finally:
        quiet.setLevel(level)
    return verdicts


def _clears(name: str, value: float, threshold: float, greater_is_better: bool) -> bool:
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    rule = {name: MetricThreshold(threshold=threshold, greater_is_better=greater_is_better)}
    try:
        mlflow.validate_evaluation_results(
            validation_thresholds=rule, candidate_result=EvaluationResult(metrics={name: value}, artifacts={})
        )
    except ModelValidationFailedException:
        return False
    return True


def git_commit(cwd: Path | str = ".") -> str:
    """The current git commit (with `-dirty` when the work tree has changes), or `unknown` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def active_run() -> RunHandle | None:
    """The MLflow run already open in this process (e.g. one a flow started), or None."""
    import mlflow

    run = mlflow.active_run()
    return None if run is None else RunHandle(run_id=run.info.run_id, artifact_uri=run.info.artifact_uri)


def _is_number(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number and abs(number) != float("inf")


def _short(value: Any, limit: int = 500) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def attach_run(run_id: str) -> RunHandle:
    """A handle on an existing run (a retrain's parent, open in its flow) that leaves its status to its owner."""
    from mlflow import MlflowClient

    try:
        return RunHandle(run_id, MlflowClient().get_run(run_id).info.artifact_uri)
    except Exception as err:  # MlflowException, connection errors
        raise TrackingError(f"cannot read MLflow run {run_id}: {err}") from err


@contextlib.contextmanager
def start_or_resume_run(
    run_name: str,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[RunHandle]:
    """Continue run `run_id` when the server has it (a resumed training; evaluation logging into the run that
    trained the model); otherwise open a new run named `run_name` with `tags` (a child of the active run, if
    any, or of `parent_run_id`). Continuing the run that is active in this process leaves its status to its owner."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if run_id:
        active = mlflow.active_run()
        try:
            run = MlflowClient().get_run(run_id)
        except MlflowException:
            log.info("run %s is not on %s; opening a new run", run_id, mlflow.get_tracking_uri())
        else:
            owned = active is None or active.info.run_id != run_id
            if owned:
                MlflowClient().update_run(run_id, status="RUNNING")
            with _running(run_id, run.info.artifact_uri, end=owned) as handle:
                yield handle
            return
    with start_run(run_name, tags, parent_run_id) as handle:
        yield handle
