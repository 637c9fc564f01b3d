"""The MLflow module against a real tracking server: runs, metrics, registry aliases and downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from flows import tracking as mlflow_io
from vit.bundle import ModelMeta, load_bundle, save_bundle


def _tiny_bundle(out: Path) -> Path:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    meta = ModelMeta(
        model="vit_tiny_patch16_224",
        classes=["bolt", "nut", "washer"],
        img_size=32,
        model_kwargs={"patch_size": 8, "depth": 1},
    )
    return save_bundle(model, meta, out)


def test_registered_model_round_trips_through_alias(tracking: str, tmp_path: Path) -> None:
    assert tracking.startswith("http://127.0.0.1:")
    assert tracking_module_configure("registry-roundtrip") == tracking
    bundle = _tiny_bundle(tmp_path / "model")
    with mlflow_io.start_run("register", tags={"data_version": "abc123"}) as run:
        run.log_params({"lr": 1e-3, "model": "vit_tiny"})
        for epoch in range(3):
            mlflow_io.epoch_logger(run)(epoch, {"val_top1": 0.5 + epoch / 10, "bad": float("nan")})
        version = mlflow_io.register_model(run, bundle, "parts-classifier", tags={"gate": "passed"})
    mlflow_io.set_alias("parts-classifier", "candidate", version)

    local = mlflow_io.download_model("models:/parts-classifier@candidate", tmp_path / "download")
    model, meta = load_bundle(local)
    original, _ = load_bundle(bundle)
    x = torch.randn(2, 3, 32, 32)
    assert meta.classes == ["bolt", "nut", "washer"]
    assert torch.equal(model(x), original(x))


def test_unknown_alias_is_a_clear_error(tracking: str, tmp_path: Path) -> None:
    tracking_module_configure("registry-missing")
    with pytest.raises(mlflow_io.TrackingError, match="models:/no-such-model@champion"):
        mlflow_io.download_model("models:/no-such-model@champion", tmp_path / "dl")


def test_git_commit_outside_git_is_unknown(tmp_path: Path) -> None:
    assert mlflow_io.git_commit(tmp_path) == "unknown"


def tracking_module_configure(experiment: str) -> str:
    return mlflow_io.configure("sqlite:///unused.db", experiment)
