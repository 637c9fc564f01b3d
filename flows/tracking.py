"""The one module that talks to MLflow: runs, metrics, artifacts and the model registry.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """MLflow could not do what was asked; the message says which server, run or model."""


def tracking_uri(default: str) -> str:
    """The tracking URI in effect: the environment's `MLFLOW_TRACKING_URI`, else `default`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def configure(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` (unless the environment overrides it) and select `experiment`.

    Returns:
        The tracking URI in effect.
    """
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment)
    except Exception as err:  # MLflow raises several client and connection errors here
        raise TrackingError(f"cannot reach MLflow tracking at {uri}: {err}") from err
    return uri


@dataclass
class RunHandle:
    """An active MLflow run; log through its methods."""

    run_id: str
    artifact_uri: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat parameters (values are stringified by MLflow; long values are truncated)."""
        import mlflow

        mlflow.log_params({k: _short(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics; non-finite and non-numeric values are skipped."""
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload one file or a whole folder."""
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store a JSON or YAML document as an artifact."""
        import mlflow

        mlflow.log_dict(dict(data), artifact_file)


@contextlib.contextmanager
def start_run(run_name: str, tags: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
    """Open a run in the configured experiment; it ends FAILED if the body raises."""
    import mlflow

    with mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}) as run:
        yield RunHandle(run_id=run.info.run_id, artifact_uri=run.info.artifact_uri)


def epoch_logger(handle: RunHandle) -> Callable[[int, Mapping[str, float]], None]:
    """A training-loop callback `(epoch, metrics)` that logs the metrics at step `epoch`."""

    def _log(epoch: int, metrics: Mapping[str, float]) -> None:
        handle.log_metrics(metrics, step=epoch)

    return _log


def register_model(handle: RunHandle, model_dir: Path, name: str, tags: Mapping[str, Any] | None = None) -> str:
    """Upload `model_dir` under the run's `model/` artifacts and register it as a new version of `name`.

    Returns:
        The new version number, as a string.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    handle.log_artifact(model_dir, artifact_path="model")
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=f"{handle.artifact_uri}/model",
        run_id=handle.run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `alias` (candidate, pilot, champion) of registered model `name` at `version`."""
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


def download_model(model_uri: str, dst: Path) -> Path:
    """Download a registered model folder (`models:/<name>@<alias>` or `models:/<name>/<version>`).

    Raises:
        TrackingError: if the model, alias or server cannot be found.
    """
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except Exception as err:  # MlflowException, connection and permission errors alike
        raise TrackingError(
            f"cannot download {model_uri} from MLflow at {mlflow.get_tracking_uri()}: {err}. "
            "Check the model name and alias with `mlflow models` or the MLflow UI."
        ) from err


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


@contextlib.contextmanager
def start_or_resume_run(
    run_name: str, run_id: str | None = None, tags: Mapping[str, Any] | None = None
) -> Iterator[RunHandle]:
    """Continue run `run_id` when the server has it (a resumed training; evaluation logging into the run that
    trained the model); otherwise open a new run named `run_name` with `tags`. Inside a run that is already
    open (a flow's), the new run is its child."""
    import mlflow
    from mlflow.exceptions import MlflowException

    current = mlflow.active_run()
    if current is not None and run_id in (None, current.info.run_id):
        if run_id:
            yield RunHandle(run_id=current.info.run_id, artifact_uri=current.info.artifact_uri)
            return
        child_tags = {k: str(v) for k, v in (tags or {}).items()}
        with mlflow.start_run(run_name=run_name, nested=True, tags=child_tags) as run:
            yield RunHandle(run_id=run.info.run_id, artifact_uri=run.info.artifact_uri)
        return
    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:
            log.info("run %s is not on %s; opening a new run", run_id, mlflow.get_tracking_uri())
            run_id = None
    if not run_id:
        with start_run(run_name, tags) as handle:
            yield handle
        return
    with mlflow.start_run(run_id=run_id) as run:
        yield RunHandle(run_id=run.info.run_id, artifact_uri=run.info.artifact_uri)
