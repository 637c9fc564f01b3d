"""The MLflow pyfunc model of a registered vitops version: an image classifier over its fastest usable engine.

`mlflow.pyfunc.load_model("models:/<name>@champion")` builds `ImageClassifier` from the artifacts that
`flows.packaging.register_version` stores: the model folder (`model.json` + weights), the ONNX export, every
engine with its metadata, and `serving.json` (the bench numbers of each engine, and which one `vitops build`
chose: `chosen`). At load it tries the chosen engine first, then the others by their recorded batch-1 p50,
and serves with the first that this machine can run:

- TensorRT engines are skipped, with a log line: this model has no TensorRT runner (a plan only runs on the
  GPU and TensorRT version that built it; serve those through vitops' own runners).
- torch-aot engines run through `aot_runtime.py` (deploy/aot_runtime.py, shipped beside this file; it imports
  torch): on a CUDA machine like the one that built them, with each uint8 image uploaded as it is and resized,
  cropped and normalised on the GPU; a CPU-built one on this CPU. Where one cannot run (no torch, no CUDA device,
  another GPU or torch version) it is skipped with a log line.
- ONNX Runtime engines run on the CPU with the thread count they were tuned for.
- OpenVINO engines (an IR in one zip) run on the CPU with their precision hint and thread count, if openvino
  is installed (imported only then) and the engine was built with this OpenVINO version on this CPU and ISA;
  otherwise the next engine is tried, in the end an ONNX Runtime one.
- If none can run, the ONNX export runs in ONNX Runtime, and without ONNX Runtime the weights run in PyTorch
  (timm and safetensors, imported only then).

The choice is in `self.engine` and the log. Preprocessing is timm's eval transform written out with PIL and
numpy (shorter side resized to `int(img_size / crop_pct)` with the model's interpolation, centre crop, /255,
normalised with the model's mean and std), so serving needs neither torch nor vitops; for a CUDA engine the same
steps run on the GPU (`aot_runtime.preprocess`, within two uint8 levels per pixel of these).

Inputs. The signature is a tensor `uint8 (-1, -1, -1, 3)`, which MLflow enforces in `PyFuncModel.predict`:

- a uint8 RGB batch `N, H, W, 3` (any H and W; each image is resized as above);
- a 1-D object array of image file paths, `np.array(paths, dtype=object)`, or of `H, W, 3` uint8 images of
  different sizes: MLflow lets such "ragged" 1-D object arrays through a tensor signature.

A plain list of paths, a single `H, W, 3` image or a DataFrame with a `path` column are refused by MLflow's
enforcement but accepted by `ImageClassifier.predict` itself: `model.unwrap_python_model().predict(None, x)`.
The output is a DataFrame with `label`, `confidence` and one `prob_<class>` column per class.

This module is shipped as code with the model (`save`) and imported as the top-level module `pyfunc_model`; it
imports only the standard library, numpy, pandas, PIL, mlflow, onnxruntime and openvino (never vit, deploy or
flows), and torch only inside the torch-aot runner (through `aot_runtime`, shipped with it). `file_manifest.py`,
shipped with it too, checks every file against the version's manifest before anything loads. With `DO_NOT_TRACK`
set, openvino's telemetry module is hidden before openvino is imported, as in `deploy.openvino`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]  # float32 N, 3, H, W -> logits N, classes

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
_BATCH = 64
REQUIREMENTS = ("mlflow", "numpy", "pillow", "pandas", "onnxruntime", "openvino")  # for serving, pinned at save


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Classifies RGB images with the fastest engine of a registered version that runs here.

    Attributes:
        meta: the model's `model.json` (classes, img_size, mean, std, interpolation, crop_pct, ...).
        engine: the engine in use: its `serving.json` entry (`file`, `target`, `precision`, `p50_ms`,
            `threads`), or `{"file": "model.onnx", ...}` / `{"target": "torch", ...}` for the fallbacks.
    """

    def load_context(self, context: Any) -> None:
        """Check every file against the version's manifest, then read the model and serving metadata and open the
        fastest engine this machine can run.

        Raises:
            ManifestError: a file differs from the manifest, is missing or was added (named in the message).
        """
        artifacts = context.artifacts
        verify_files(Path(artifacts["serving"]).parents[1] if "serving" in artifacts else None)
        model_dir = Path(artifacts["model"])
        self.meta: dict[str, Any] = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        serving = json.loads(Path(artifacts["serving"]).read_text(encoding="utf-8")) if "serving" in artifacts else {}
        engines_dir = Path(artifacts["engines"]) if "engines" in artifacts else None
        self.engine, self._run = pick_engine(serving.get("engines", []), engines_dir, artifacts.get("onnx"), model_dir)
        log.info("vitops pyfunc: serving with %s", describe_engine(self.engine))

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Class probabilities of each image.

        Args:
            context: unused (MLflow passes it).
            model_input: a uint8 `N, H, W, 3` batch or a 1-D object array of paths or `H, W, 3` images (what
                the signature lets through); called directly, also a single `H, W, 3` image, a list of paths
                or images, or a DataFrame with a `path` column.
            params: unused.

        Returns:
            One row per image: `label`, `confidence` and `prob_<class>` for every class.
        """
        if hasattr(self._run, "classify_images"):  # a CUDA engine: uint8 images preprocessed on its device
            uint8_batch = isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8
            if uint8_batch and model_input.ndim == 4 and model_input.shape[-1] == 3:
                images = model_input  # uploaded as it is, a chunk at a time
            else:
                images = [np.asarray(img) for img in _to_images(model_input)]
            chunks = [images[i : i + _BATCH] for i in range(0, len(images), _BATCH)]
            logits = np.concatenate([self._run.classify_images(chunk) for chunk in chunks])
        else:
            batch = np.stack([self.preprocess(img) for img in _to_images(model_input)])
            logits = np.concatenate([self._run(batch[i : i + _BATCH]) for i in range(0, len(batch), _BATCH)])
        probs = _softmax(np.asarray(logits, dtype=np.float64)).astype(np.float32)
        classes = list(self.meta["classes"])
        best = probs.argmax(axis=1)
        frame = pd.DataFrame({"label": [classes[i] for i in best], "confidence": probs[np.arange(len(best)), best]})
        for i, name in enumerate(classes):
            frame[f"prob_{name}"] = probs[:, i]
        return frame

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The engine's logits of a `preprocess`ed float32 `N, 3, H, W` batch: what `predict` runs after decoding,
        for timing the engine alone (the pilot's latency)."""
        return self._run(batch)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """timm's eval transform on one RGB image: float32 `3, img_size, img_size`."""
        size = int(self.meta["img_size"])
        scale = math.floor(size / (self.meta.get("crop_pct") or 0.875))  # timm's default crop_pct when unset
        img = _resize_shorter(img, scale, _INTERPOLATION[self.meta.get("interpolation", "bicubic")])
        img = _center_crop(img, size)
        x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.meta["mean"], np.float32)) / np.asarray(self.meta["std"], np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def verify_files(root: Path | None) -> int:
    """Check the pyfunc folder `root` against its `vitops_manifest.json` (every file, its sha256, nothing added):
    how many files were checked, 0 for a version registered before vitops wrote manifests (logged). Raises
    `ManifestError`, naming the file, when one differs, is missing, or is not in the manifest."""
    manifest = _shipped("file_manifest", _code_file("file_manifest.py", "common"))
    if root is None or not (root / manifest.MANIFEST_FILE).is_file():
        log.warning("vitops pyfunc: %s holds no %s (registered before vitops wrote manifests): its files are checked "
                    "against serving.json only", root, manifest.MANIFEST_FILE)  # fmt: skip
        return 0
    return manifest.check_folder(root, manifest.read_manifest(root))


def save(path: Path, artifacts: dict[str, str], classes: list[str], img_size: int) -> Path:
    """Save an `ImageClassifier` with its artifacts into `path`, shipping this file as its code.

    Args:
        path: an empty or missing folder.
        artifacts: `model` (model folder), `onnx`, `serving` (serving.json) and, with engines, `engines`.
        classes: class names in logit order (one `prob_<class>` output column each).
        img_size: the model's input side, for the input example.

    Call it on this file imported as the top-level module `pyfunc_model` (as `flows.registry` does): cloudpickle
    records the class by its module's name, and a loader finds `pyfunc_model` in the model's code/ folder.
    """
    from importlib.metadata import version

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    if __name__ != "pyfunc_model":
        raise RuntimeError(f"import {__file__} as the top-level module pyfunc_model to save it, not as {__name__}")
    outputs = [ColSpec("string", "label"), ColSpec("float", "confidence")]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema(outputs + [ColSpec("float", f"prob_{c}") for c in classes]),
    )
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=ImageClassifier(),
        artifacts=artifacts,
        code_paths=[
            __file__,
            str(_code_file("aot_runtime.py", "deploy")),
            str(_code_file("file_manifest.py", "common")),
        ],
        signature=signature,
        input_example=np.zeros((1, img_size, img_size, 3), dtype=np.uint8),
        pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS],  # no inference run
    )
    return path


def pick_engine(
    entries: list[dict[str, Any]], engines_dir: Path | None, onnx_path: str | None, model_dir: Path
) -> tuple[dict[str, Any], Runner]:
    """The chosen engine if it opens here, else the fastest that does (lowest `p50_ms`; unmeasured ones last),
    else a fallback.

    Args:
        entries: the `engines` list of `serving.json`.
        engines_dir: where the engine files are (`file` is relative to it).
        onnx_path: the ONNX export, run in ONNX Runtime when no engine can be.
        model_dir: the model folder, run in PyTorch when ONNX Runtime is missing too.
    """
    ranked = sorted(entries, key=lambda e: (not e.get("chosen"), e.get("p50_ms") is None, e.get("p50_ms") or 0.0))
    runners = {
        "onnxruntime": _ort_runner,
        "openvino": _ov_runner,
        "torch-aot": lambda path, threads, entry: _aot_runner(path, entry, model_dir),
    }
    for entry in ranked:
        if entry.get("target") == "tensorrt":
            log.info("vitops pyfunc: skipping TensorRT engine %s: this model has no TensorRT runner", entry["file"])
            continue
        if entry.get("target") not in runners or engines_dir is None:
            log.info("vitops pyfunc: skipping engine %s: unknown target %r", entry.get("file"), entry.get("target"))
            continue
        try:
            run = runners[entry["target"]](engines_dir / entry["file"], int(entry.get("threads") or 0), entry)
            return dict(entry), run
        except _CannotRunHere as err:
            log.info("vitops pyfunc: skipping %s engine %s: %s", entry["target"], entry["file"], err)
        except Exception as err:  # ImportError, or an engine this runtime or machine cannot load
            log.warning("vitops pyfunc: cannot open engine %s (%s); trying the next one", entry["file"], err)
    if onnx_path:
        try:
            fallback = {"file": "model.onnx", "target": "onnxruntime", "precision": "fp32", "p50_ms": None}
            return {**fallback, "threads": 0}, _ort_runner(Path(onnx_path), 0, fallback)
        except Exception as err:
            log.warning("vitops pyfunc: cannot run the ONNX export in ONNX Runtime (%s); using PyTorch", err)
    return {"file": "model/weights.safetensors", "target": "torch", "precision": "fp32", "p50_ms": None}, (
        _torch_runner(model_dir)
    )


def describe_engine(engine: dict[str, Any]) -> str:
    """One line naming an engine, e.g. `onnxruntime fp32 onnxruntime/fp32.onnx (p50 0.41 ms, 1 threads)`."""
    timing = f"p50 {engine['p50_ms']} ms, " if engine.get("p50_ms") is not None else ""
    name = f"{engine.get('target')} {engine.get('precision')} {engine.get('file')}"
    return f"{name} ({timing}{engine.get('threads', 0)} threads)"


def _ort_runner(path: Path, threads: int, entry: dict[str, Any]) -> Runner:
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # a ViT graph is one chain of ops
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


class _CannotRunHere(RuntimeError):
    """An engine for other hardware (a torch-aot engine for CUDA on a machine without it): skipped, not an error."""


def _code_file(name: str, package: str) -> Path:
    """A module shipped beside this file in the model's code/; in a source checkout, `<package>/<name>`."""
    here = Path(__file__).resolve()
    return here.with_name(name) if here.with_name(name).is_file() else here.parents[1] / package / name


def _shipped(name: str, file: Path) -> Any:
    """A module shipped as code with the model, imported from its file as the top-level module `name`."""
    import importlib.util

    module = sys.modules.get(name)
    if module is None or Path(module.__file__ or "").resolve() != file:
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _aot_runner(path: Path, entry: dict[str, Any], model_dir: Path) -> Runner:
    """A torch-aot engine, checked against this machine and opened by `aot_runtime` (imported from its file as the
    top-level module `aot_runtime`); a CUDA engine's runner also takes uint8 images (`classify_images`)."""
    runtime = _shipped("aot_runtime", _code_file("aot_runtime.py", "deploy"))
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        engine = runtime.open_engine(path, entry.get("meta") or {})
    except runtime.AotUnavailable as err:
        raise _CannotRunHere(str(err)) from err
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    runner = runtime.HostRunner(engine, meta)
    if engine.device == "cuda" and meta.get("interpolation", "bicubic") in ("nearest", "bilinear", "bicubic"):
        return runner
    return runner.__call__  # preprocessed on the CPU, as for the other engines


def _ov_runner(path: Path, threads: int, entry: dict[str, Any]) -> Runner:
    """An OpenVINO engine zip compiled for the CPU, after checking it was built with this OpenVINO on this CPU."""
    if os.environ.get("DO_NOT_TRACK", "").lower() not in ("", "0", "false", "no"):
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # its no-op stubs then
    import openvino as ov

    if not path.is_file():
        raise FileNotFoundError(path)
    meta = entry.get("meta") or {}
    extra = meta.get("extra") or {}
    core = ov.Core()
    here = {
        "OpenVINO version": ov.get_version(),
        "CPU": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
        "ISA": _cpu_isa(),
    }
    built = {"OpenVINO version": meta.get("runtime_version"), "CPU": meta.get("device"), "ISA": extra.get("isa")}
    diffs = [f"{k} {built[k]!r} (engine) != {here[k]!r} (here)" for k in here if built[k] != here[k]]
    if diffs:
        raise RuntimeError(f"built for another machine: {'; '.join(diffs)}")
    with zipfile.ZipFile(path) as zf:
        xml, weights = zf.read("model.xml"), zf.read("model.bin")
    model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": extra.get("inference_precision_hint") or "f32",  # never the plugin's own choice
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = core.compile_model(model, "CPU", config).create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(x, np.float32)})
        return request.get_output_tensor(0).data.copy()

    return run


# deploy.openvino.ISA_FLAGS, copied because this module imports nothing of vitops; a test keeps them equal
# (an engine whose metadata names its ISA otherwise would be refused on the machine that built it).
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)


def _cpu_isa() -> list[str]:
    """The same names, in the same order, as deploy.openvino.cpu_isa writes into the engine metadata."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return [label for flag, label in ISA_FLAGS if flag in flags]


def _torch_runner(model_dir: Path) -> Runner:
    import timm
    import torch
    from safetensors.torch import load_file

    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    kwargs = {"num_classes": len(meta["classes"]), **meta.get("model_kwargs", {})}
    if meta["model"].startswith(("vit", "deit", "eva", "beit", "swin", "levit")):  # CNNs take no img_size
        kwargs.setdefault("img_size", meta["img_size"])
    net = timm.create_model(meta["model"], pretrained=False, **kwargs)
    net.load_state_dict(load_file(str(model_dir / "weights.safetensors")), strict=True)
    net.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    return run


def _to_images(model_input: Any) -> list[Image.Image]:
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise ValueError(f"a DataFrame input needs a `path` column; got columns {list(model_input.columns)}")
        items = list(model_input["path"])
    elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            items = [model_input]
        elif model_input.ndim == 4:
            items = list(model_input)
        else:
            raise ValueError(f"expected uint8 images N,H,W,3 or H,W,3; got shape {model_input.shape}")
    elif isinstance(model_input, str | os.PathLike):
        items = [model_input]
    else:  # a list, or a 1-D object array of paths or images
        items = list(model_input)
    if not items:
        raise ValueError("no images to classify")
    return [_open(item) for item in items]


def _open(item: Any) -> Image.Image:
    if isinstance(item, str | os.PathLike):
        with Image.open(item) as img:
            return img.convert("RGB")
    arr = np.asarray(item)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected a uint8 RGB image H,W,3 or an image path; got {arr.dtype} of shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def _resize_shorter(img: Image.Image, short: int, interpolation: Image.Resampling) -> Image.Image:
    # torchvision's Resize(int): the shorter side becomes `short`, the longer one int(short * long / short_side).
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return img if size == (w, h) else img.resize(size, interpolation)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    # torchvision's CenterCrop: zero padding when the image is smaller (crop_pct > 1), then round((side - size) / 2).
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0))
        img, (w, h) = canvas, canvas.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
