"""The MLflow tracking module against a real tracking server: run handles, nesting, downloads, thresholds."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import timm
import torch
from mlflow import MlflowClient

from vitops.flows import tracking as mlflow_io
from vitops.vit.bundle import ModelMeta, load_bundle, save_bundle


def _tiny_bundle(out: Path) -> Path:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    meta = ModelMeta(
        model="vit_tiny_patch16_224",
        classes=["bolt", "nut", "washer"],
        img_size=32,
        model_kwargs={"patch_size": 8, "depth": 1},
    )
    return save_bundle(model, meta, out)


@pytest.mark.integration
def test_handles_log_to_their_own_run_inside_an_outer_run(tracking: str) -> None:
    """Under a flow's open run, a stage's run is its child, logs to its own id, and resuming a run works."""
    mlflow_io.configure("sqlite:///unused.db", "nested-runs")
    with mlflow.start_run(run_name="flow") as outer:
        with mlflow_io.start_run("train", tags={"stage": "train"}) as child:
            child.log_params({"lr": 1e-3})
            for epoch in range(3):
                mlflow_io.epoch_logger(child)(epoch, {"val_top1": 0.5 + epoch / 10, "bad": float("nan")})
        with mlflow_io.start_or_resume_run("evaluate", run_id=child.run_id) as again:
            again.log_metrics({"test_top1": 0.9})
        assert mlflow.active_run().info.run_id == outer.info.run_id  # the outer run is still the active one
    client = MlflowClient(tracking)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert run.data.params == {"lr": "0.001"}
    assert run.data.metrics == {"val_top1": pytest.approx(0.7), "test_top1": pytest.approx(0.9)}
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.run_id, "val_top1")] == [0, 1, 2]
    assert "test_top1" not in client.get_run(outer.info.run_id).data.metrics


@pytest.mark.integration
def test_a_failing_body_ends_the_run_failed(tracking: str) -> None:
    mlflow_io.configure("sqlite:///unused.db", "failed-runs")
    with pytest.raises(RuntimeError), mlflow_io.start_run("crash") as run:
        raise RuntimeError("boom")
    assert MlflowClient(tracking).get_run(run.run_id).info.status == "FAILED"


@pytest.mark.integration
def test_registered_folder_downloads_as_a_model_folder(tracking: str, tmp_path: Path) -> None:
    mlflow_io.configure("sqlite:///unused.db", "registry-roundtrip")
    bundle = _tiny_bundle(tmp_path / "model")
    with mlflow_io.start_run("register") as run:
        run.log_artifact(bundle, artifact_path="model")
    client = MlflowClient(tracking)
    client.create_registered_model("parts-classifier")
    version = client.create_model_version("parts-classifier", source=f"{run.artifact_uri}/model", run_id=run.run_id)
    client.set_registered_model_alias("parts-classifier", "candidate", version.version)

    local = mlflow_io.download_model("models:/parts-classifier@candidate", tmp_path / "download")
    model, meta = load_bundle(local)
    original, _ = load_bundle(bundle)
    x = torch.randn(2, 3, 32, 32)
    assert meta.classes == ["bolt", "nut", "washer"]
    assert torch.equal(model(x), original(x))


@pytest.mark.integration
def test_unknown_alias_is_a_clear_error(tracking: str, tmp_path: Path) -> None:
    mlflow_io.configure("sqlite:///unused.db", "registry-missing")
    with pytest.raises(mlflow_io.TrackingError, match="models:/no-such-model@champion"):
        mlflow_io.download_model("models:/no-such-model@champion", tmp_path / "dl")


def test_threshold_verdicts_follow_mlflow_validation() -> None:
    verdicts = mlflow_io.threshold_verdicts(
        {"top1": 0.91, "p95_ms": 12.0, "tco": 310.0},
        {"top1": (0.90, True), "p95_ms": (10.0, False), "tco": (310.0, False)},
    )
    assert verdicts == {"top1": True, "p95_ms": False, "tco": True}


def test_git_commit_outside_git_is_unknown(tmp_path: Path) -> None:
    assert mlflow_io.git_commit(tmp_path) == "unknown"
