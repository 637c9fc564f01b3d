"""The served pyfunc model and torch-aot engines: images preprocessed on the engine's device equal the served PIL
preprocessing; a CUDA engine is skipped, with a log line, where it cannot run; a CPU-built engine serves on the
CPU (slow) and a CUDA one on the GPU with its preprocessing there (gpu). Needs no MLflow server, and no MLflow at
all on a GPU machine without it (the model class then gets a stand-in base class)."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.engines import AOT_CLASSES as CLASSES
from helpers.engines import aot_release, tiny_vit
from PIL import Image

from vitops.deploy import aot_runtime
from vitops.vit.bundle import ModelMeta, load_bundle, save_bundle


@pytest.fixture(scope="module")
def pyfunc_model() -> types.ModuleType:
    """flows/pyfunc_model.py; where MLflow is not installed (a GPU machine), with a stand-in for mlflow.pyfunc:
    the model class needs only its base class from it."""
    if importlib.util.find_spec("mlflow") is None:
        stub = types.ModuleType("mlflow")
        stub.pyfunc = types.ModuleType("mlflow.pyfunc")  # type: ignore[attr-defined]
        stub.pyfunc.PythonModel = object  # type: ignore[attr-defined]
        sys.modules.setdefault("mlflow", stub)
        sys.modules.setdefault("mlflow.pyfunc", stub.pyfunc)  # type: ignore[attr-defined]
    from vitops.flows import pyfunc_model

    return pyfunc_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine tests' tiny ViT (32 px, 5 classes) as a model folder, ImageNet normalisation, crop 0.875."""
    meta = ModelMeta(
        "vit_tiny_patch16_224", CLASSES, 32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
        model_kwargs={"patch_size": 8, "depth": 2},
    )  # fmt: skip
    return save_bundle(tiny_vit(num_classes=len(CLASSES)), meta, tmp_path_factory.mktemp("release") / "model")


class _Context:
    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def context(model_dir: Path, engines: Path, entries: list[dict]) -> _Context:
    """The artifacts `flows.packaging` stores: serving.json with each engine's metadata, no ONNX export."""
    for entry in entries:
        if "meta" not in entry:
            entry["meta"] = json.loads((engines / f"{entry['file']}.json").read_text())
    serving = model_dir.parent / "serving.json"
    serving.write_text(json.dumps({"engines": entries}))
    return _Context({"model": str(model_dir), "engines": str(engines), "serving": str(serving)})


def pictures(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 48), (40, 48), (30, 50), (20, 28)]]


def torch_probs(model_dir: Path, batch: list[np.ndarray]) -> np.ndarray:
    """What the model folder says through timm's eval transform: the reference for every runtime."""
    from vitops.vit.data import create_transforms

    model, meta = load_bundle(model_dir)
    transform = create_transforms(meta, is_training=False)
    with torch.inference_mode():
        return torch.softmax(model(torch.stack([transform(Image.fromarray(p)) for p in batch])), dim=1).numpy()


def probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"prob_{c}" for c in CLASSES]].to_numpy()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0, 1.15])
def test_preprocessing_on_the_device_equals_the_served_pil_preprocessing(
    pyfunc_model: types.ModuleType, interpolation: str, crop_pct: float
) -> None:
    served = pyfunc_model.ImageClassifier()
    served.meta = {"img_size": 32, "crop_pct": crop_pct, "interpolation": interpolation,
                   "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip
    batch = pictures(0) + [np.random.default_rng(1).integers(0, 256, (224, 300, 3), dtype=np.uint8)]
    expected = np.stack([served.preprocess(Image.fromarray(p)) for p in batch])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        m = served.meta
        got = aot_runtime.preprocess(batch, 32, crop_pct, interpolation, m["mean"], m["std"], device).cpu().numpy()
        levels = np.abs(got - expected) * np.asarray(m["std"], np.float32)[:, None, None] * 255
        assert levels.max() <= 2.01 and levels.mean() < 0.1, (device, levels.max(), levels.mean())
        same_size = np.stack(batch[:2])  # one N, H, W, 3 array: uploaded as it is
        as_array = aot_runtime.preprocess(same_size, 32, crop_pct, interpolation, m["mean"], m["std"], device)
        np.testing.assert_array_equal(as_array.cpu().numpy(), got[:2])


def test_a_cuda_engine_is_skipped_with_a_log_line_where_it_cannot_run(
    pyfunc_model: types.ModuleType, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = tmp_path / "torch-aot" / "fp16.zip"
    engine.parent.mkdir()
    with zipfile.ZipFile(engine, "w") as zf:
        zf.writestr(aot_runtime.PACKAGE, b"an AOTInductor package for some GPU")
    meta = {"target": "torch-aot", "precision": "fp16", "runtime_version": torch.__version__, "device": "NVIDIA H200",
            "compute_capability": "9.0", "extra": {"device_type": "cuda", "cuda": "13.0", "route": "aoti"}}  # fmt: skip
    if torch.cuda.is_available():
        meta["device"] = "a GPU this is not"
    entries = [{"file": "torch-aot/fp16.zip", "target": "torch-aot", "precision": "fp16", "p50_ms": 0.9,
                "chosen": True, "meta": meta}]  # fmt: skip
    served = pyfunc_model.ImageClassifier()
    with caplog.at_level(logging.INFO):
        served.load_context(context(model_dir, tmp_path, entries))
    assert served.engine["target"] == "torch"  # no ONNX export here: the weights in PyTorch
    why = "no CUDA device" if not torch.cuda.is_available() else "GPU 'a GPU this is not' (engine) != "
    assert "skipping torch-aot engine torch-aot/fp16.zip: " in caplog.text and why in caplog.text
    batch = pictures(2)
    np.testing.assert_allclose(probs(served.predict(None, np.array(batch, dtype=object))),
                               torch_probs(model_dir, batch), atol=1e-4)  # fmt: skip


ENTRY = {"target": "torch-aot", "chosen": True}


@pytest.mark.slow
def test_a_cpu_built_engine_serves_on_this_cpu_like_torch(pyfunc_model: types.ModuleType, tmp_path: Path) -> None:
    model_dir, engine, _ = aot_release(tmp_path, "fp32", "cpu", fallback="none")
    served = pyfunc_model.ImageClassifier()
    served.load_context(context(model_dir, engine.parents[1], [ENTRY | {"file": "torch-aot/fp32.zip"}]))
    assert served.engine["file"] == "torch-aot/fp32.zip" and not hasattr(served._run, "classify_images")
    batch = pictures(3)
    np.testing.assert_allclose(probs(served.predict(None, np.array(batch, dtype=object))),
                               torch_probs(model_dir, batch), atol=1e-4)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pyfunc_serves_a_cuda_engine_with_its_preprocessing_on_the_gpu(
    pyfunc_model: types.ModuleType, cuda_aot_release: tuple
) -> None:
    model_dir, engine, _ = cuda_aot_release
    served = pyfunc_model.ImageClassifier()
    served.load_context(context(model_dir, engine.parents[1], [ENTRY | {"file": "torch-aot/fp16.zip"}]))
    assert served.engine["file"] == "torch-aot/fp16.zip" and hasattr(served._run, "classify_images")
    batch = pictures(4)
    frame = served.predict(None, np.array(batch, dtype=object))
    expected = torch_probs(model_dir, batch)
    np.testing.assert_allclose(probs(frame), expected, atol=2e-2)
    assert list(frame["label"]) == [CLASSES[i] for i in expected.argmax(1)]
    same_size = np.stack(batch[:2])  # an N, H, W, 3 uint8 batch goes to the GPU without PIL
    np.testing.assert_allclose(probs(served.predict(None, same_size)), expected[:2], atol=2e-2)
    x = np.stack([served.preprocess(Image.fromarray(p)) for p in batch])  # the pilot's engine-only timing path
    np.testing.assert_array_equal(served.logits(x).argmax(1), expected.argmax(1))
