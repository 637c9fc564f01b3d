"""`vitops train`, `vitops train --baseline` and `vitops evaluate` end to end, logged to a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.vit import write_digits, write_manifest, write_params, write_tiny_checkpoint

from vitops.flows.cli import main


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    write_digits(tmp_path / "data", size=40)
    write_manifest(tmp_path / "data", tmp_path / "manifest.csv")
    write_tiny_checkpoint(tmp_path / "pretrained.safetensors")
    return tmp_path


@pytest.mark.integration
def test_train_evaluate_log_params_metrics_artifacts_and_tags(project: Path, tracking: str) -> None:
    from mlflow import MlflowClient

    params = write_params(project, project / "data", project / "manifest.csv", project / "pretrained.safetensors")
    assert main(["--params", str(params), "train"]) == 0
    out = project / "out" / "vit"
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["model_kwargs"]["patch_size"] == 8 and meta["img_size"] == 32
    assert meta["extra"]["source"].startswith("file:")
    run_id = meta["extra"]["mlflow_run_id"]

    assert main(["--params", str(params), "evaluate"]) == 0
    metrics = json.loads((project / "out" / "eval" / "vit" / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values())  # flat and numeric: DVC metrics can show it
    assert {"test_top1", "test_top5", "test_ece", "test_macro_f1", "test_f1/3"} <= set(metrics)
    assert (project / "out" / "eval" / "vit" / "reliability.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=tracking)
    run = client.get_run(run_id)
    assert run.data.params["source"].startswith("file:") and run.data.params["layer_decay"] == "0.85"
    assert {"data_version", "git_commit"} <= set(run.data.tags)
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [0, 1]
    assert "test_top1" in run.data.metrics
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert {"model/model.json", "model/weights.safetensors"} <= files
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.pt"]
    plots = {f.path for f in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/reliability.png", "evaluation/confusion_matrix.png"} <= plots


def test_baseline_trains_resnet_through_same_pipeline(project: Path, capsys: pytest.CaptureFixture) -> None:
    params = write_params(project, project / "data", project / "manifest.csv", project / "pretrained.safetensors")
    assert main(["--params", str(params), "train", "--baseline", "--no-tracking"]) == 0
    assert main(["--params", str(params), "evaluate", "--baseline", "--no-tracking"]) == 0
    meta = json.loads((project / "out" / "baseline" / "model" / "model.json").read_text())
    assert meta["model"] == "resnet18" and meta["extra"]["source"] == "scratch"
    assert "test top-1" in capsys.readouterr().out


def test_missing_weights_fail_cleanly_and_keep_earlier_model(project: Path, capsys: pytest.CaptureFixture) -> None:
    params = write_params(project, project / "data", project / "manifest.csv", project / "pretrained.safetensors")
    assert main(["--params", str(params), "train", "--no-tracking", "--epochs", "1"]) == 0
    weights = (project / "out" / "vit" / "model" / "weights.safetensors").read_bytes()
    missing = project / "gone.safetensors"
    code = main(["--params", str(params), "train", "--no-tracking", "--overwrite", "--source", f"file:{missing}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"file:{missing}" in err and "does not exist" in err
    assert (project / "out" / "vit" / "model" / "weights.safetensors").read_bytes() == weights
    code = main(["--params", str(params), "train", "--no-tracking", "--source", "hf-hub:timm/not_cached_model"])
    assert code == 2 and "hf-hub:timm/not_cached_model" in capsys.readouterr().err


def test_evaluate_without_a_model_says_how_to_get_one(project: Path, capsys: pytest.CaptureFixture) -> None:
    params = write_params(project, project / "data", project / "manifest.csv", project / "pretrained.safetensors")
    assert main(["--params", str(params), "evaluate", str(project / "nothing"), "--no-tracking"]) == 2
    assert "vitops train" in capsys.readouterr().err


@pytest.mark.integration
def test_fine_tunes_from_a_registered_model_alias(project: Path, tracking: str) -> None:
    """Retraining from the serving model: `mlflow:models:/<name>@<alias>` resolves to the registered folder."""
    from mlflow import MlflowClient

    from vitops.flows import tracking as mlflow_io

    params = write_params(project, project / "data", project / "manifest.csv", project / "pretrained.safetensors")
    assert main(["--params", str(params), "train", "--no-tracking", "--epochs", "1"]) == 0
    first = project / "out" / "vit" / "model"
    mlflow_io.configure(tracking, "registry-source")
    with mlflow_io.start_run("register-first") as run:
        run.log_artifact(first, artifact_path="model")
    # a plain model-folder version (as older vitops registered them); `vitops register` versions nest it in pyfunc
    client = MlflowClient(tracking)
    client.create_registered_model("digits-vit")
    version = client.create_model_version("digits-vit", source=f"{run.artifact_uri}/model", run_id=run.run_id)
    client.set_registered_model_alias("digits-vit", "champion", version.version)

    out = project / "retrained"
    code = main(
        ["--params", str(params), "train", "--no-tracking", "--epochs", "1", "--out-dir", str(out),
         "--source", "mlflow:models:/digits-vit@champion"]
    )  # fmt: skip
    assert code == 0
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["extra"]["source"] == "mlflow:models:/digits-vit@champion"
    assert (first / "weights.safetensors").is_file()  # the registered model's folder is left as it was

    missing = main(
        ["--params", str(params), "train", "--no-tracking", "--overwrite", "--out-dir", str(out),
         "--source", "mlflow:models:/digits-vit@no-such-alias"]
    )  # fmt: skip
    assert missing == 2
    assert (out / "model" / "weights.safetensors").is_file()  # a failed retrain keeps the earlier model
