"""Tiny releases registered in MLflow, for the registry, pyfunc and pilot tests: a tiny ViT as a model folder with
its ONNX export and an FP32 ONNX Runtime engine, registered as versions of a uniquely named model."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient

from vitops.deploy.export import export_onnx
from vitops.deploy.onnxrt import build_ort_engine
from vitops.deploy.parity import torch_logits
from vitops.flows import packaging
from vitops.vit.bundle import ModelMeta, save_bundle

CLASSES = ["bolt", "nut", "washer"]


@dataclass
class Release:
    """What a flow hands to `register_version`: model folder, ONNX export, engines, bench numbers."""

    model_dir: Path
    onnx: Path
    engines: list[Path]
    serving: dict[str, Any]
    model: torch.nn.Module


def build_release(out: Path, seed: int = 0, head_shift: int = 0) -> Release:
    """A tiny ViT (32 px, 1 block) as a model folder, its ONNX export and an FP32 ONNX Runtime engine.

    `head_shift` rolls the classifier's rows: the release then names class (k + shift) where the unshifted one of
    the same seed names class k, with the same confidence, so the two disagree on every image."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=len(CLASSES))
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # margins like a trained model's, so argmax is stable across runtimes
        if head_shift:
            model.head.weight.copy_(torch.roll(model.head.weight, head_shift, dims=0))
            model.head.bias.copy_(torch.roll(model.head.bias, head_shift, dims=0))
    model.eval()
    meta = ModelMeta(
        model="vit_tiny_patch16_224",
        classes=CLASSES,
        img_size=32,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=0.875,
        model_kwargs={"patch_size": 8, "depth": 1},
    )
    model_dir = save_bundle(model, meta, out / "model")
    x = np.random.default_rng(seed).standard_normal((8, 3, 32, 32), dtype=np.float32)
    onnx = export_onnx(model, torch.from_numpy(x[:2]), out / "export" / "model.onnx", exporter="torchscript").path
    engine, _ = build_ort_engine(
        onnx, out / "engines" / "onnxruntime" / "fp32.onnx", x, torch_logits(model, x), threads=1
    )
    serving = {
        "engines": [{"file": "onnxruntime/fp32.onnx", "target": "onnxruntime", "precision": "fp32", "p50_ms": 0.4}]
    }
    return Release(model_dir, onnx, [engine], serving, model)


def new_run(experiment: str = "registry-tests") -> str:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client.create_run(experiment_id, tags={"purpose": "test"}).info.run_id


def register(name: str, release: Release, passed: bool = True, **tags: str) -> str:
    gate = {"gate.passed": str(passed).lower(), "gate.reasons": "" if passed else "top1 0.50 < 0.90"}
    return packaging.register_version(
        name, new_run(), release.model_dir, release.onnx, release.engines, release.serving, {**gate, **tags}
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
