"""The stages of vitops as typed functions: what the `vitops` CLI, the dvc.yaml stages (through the CLI) and the
Prefect flows all call. Each takes the typed params plus explicit overrides and returns a typed result with
the paths written, the key metrics and the MLflow run id; none of them prints or exits.

One retraining run, top to bottom:

    validate(params)                          the Great Expectations data gate          -> ValidateResult
    pretrain_standin(params)                  offline quickstart only                    -> PretrainResult
    train(params, baseline=True)              the CNN baseline                           -> TrainResult
    train(params)                             fine-tune the ViT                          -> TrainResult
    evaluate(params), evaluate(.., baseline)  test split: metrics, predictions, plots    -> EvaluateResult
    export(params)                            ONNX + parity gate                         -> ExportResult
    build(params)                             engines for the target + parity gates      -> BuildResult
    bench(params)                             latency table per backend                  -> BenchOutcome
    gate(params)                              the three-KPI gate and its report          -> GateResult
    register(params)                          a registry version; `candidate` if passed  -> RegisterResult

Gates that say no: `validate` and `gate` return `passed=False`; a parity gate raises `deploy.parity.ParityError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, sha256_file
from vitops.flows.config import Params
from vitops.flows.recipe import load_rows, recipe_for, same_named

log = logging.getLogger(__name__)

# Engine files under engine.out_dir, one folder per target (each a DVC output of its own).
ORT_FP32 = "onnxruntime/fp32.onnx"
ORT_INT8 = "onnxruntime/int8.onnx"
TRT_DIR = "tensorrt"
OV_DIR = "openvino"  # <precision>.zip: OpenVINO IR (xml + bin) in one uncompressed zip
PREDICTIONS_FILE = "predictions.csv"


# ---------------------------------------------------------------------------------------------------- validate


@dataclass
class ValidateResult:
    passed: bool
    data: Path
    report_path: Path
    manifest_path: Path
    data_docs: str
    counts: dict[str, int]
    rejected: list[dict[str, str]]
    failures: list[str]
    warnings: list[str]


def validate(
    params: Params,
    data: Path | None = None,
    report: Path | None = None,
    manifest: Path | None = None,
    reference: Path | None = None,
    workers: int | None = None,
) -> ValidateResult:
    """Scan the dataset into a manifest and run the Great Expectations gate (nothing is moved or changed)."""
    from vitops.data_checks.gate import validate_folder
    from vitops.data_checks.suite import GateRules

    v = params.validate_
    data = Path(data or params.data.raw_dir)
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist: give the dataset folder, or import data first")
    rules = GateRules(
        classes=tuple(params.data.classes),
        min_width=v.min_width,
        min_height=v.min_height,
        min_images_per_class=v.min_images_per_class,
        max_imbalance_ratio=v.max_imbalance_ratio,
        max_rejected_fraction=v.max_rejected_fraction,
        drift_kl_threshold=v.drift_kl_threshold,
    )
    report_path = Path(report or v.report)
    manifest_path = Path(manifest or v.manifest)
    out = validate_folder(
        data,
        rules,
        fractions=params.data.split.model_dump(),
        manifest_path=manifest_path,
        report_path=report_path,
        reference_path=reference or v.reference_manifest,
        workers=v.workers if workers is None else workers,
    )
    return ValidateResult(
        passed=bool(out["passed"]),
        data=data,
        report_path=report_path,
        manifest_path=manifest_path,
        data_docs=str(out["data_docs"]),
        counts=dict(out["counts"]),
        rejected=list(out["rejected"]),
        failures=list(out["failures"]),
        warnings=list(out["warnings"]),
    )


# ---------------------------------------------------------------------------------------------------- pretrain


@dataclass
class PretrainResult:
    path: Path
    val_top1: float


def pretrain_standin(
    params: Params, out: Path | None = None, images: int | None = None, epochs: int | None = None
) -> PretrainResult:
    """Pretrain the stand-in "external" checkpoint of the offline quickstart (not public weights)."""
    from vitops.vit.standin import StandinSpec
    from vitops.vit.standin import pretrain_standin as _pretrain

    p = params.pretrain
    spec = StandinSpec(**same_named(StandinSpec, p))
    spec.images = images or p.images
    spec.epochs = epochs or p.epochs
    path = Path(out or p.out)
    # its own checkpoints go to artifacts/, never next to the shipped file
    info = _pretrain(spec, path, work_dir=Path("artifacts/standin-work"))
    return PretrainResult(path=path, val_top1=float(info["val_top1"]))


# ---------------------------------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    kind: str  # vit | baseline
    model_dir: Path
    out_dir: Path
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    train_seconds: float
    device: str
    world_size: int
    data_version: str | None
    run_id: str | None
    is_main: bool = True


def train(
    params: Params,
    baseline: bool = False,
    source: str | None = None,
    epochs: int | None = None,
    out_dir: Path | None = None,
    data: Path | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    track: bool = True,
) -> TrainResult:
    """Fine-tune the ViT (or train the CNN baseline) on the validated data; write OUT_DIR/model, checkpoints and
    train_metrics.json; log the run to MLflow. Under torchrun every rank calls this; only rank 0 writes."""
    from vitops.flows.training import run_training

    recipe = recipe_for(params, baseline)
    if source:
        recipe.source = source
    if epochs:
        recipe.config["epochs"] = epochs
    return run_training(
        params,
        recipe,
        out_dir=Path(out_dir or recipe.out_dir),
        root=Path(data or params.data.raw_dir),
        device=device,
        resume=resume,
        overwrite=overwrite,
        track=track,
    )


# ---------------------------------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateResult:
    kind: str
    model_dir: Path
    out_dir: Path
    metrics: dict[str, float]
    predictions: Path
    plots: list[Path]
    run_id: str | None


def evaluate(
    params: Params,
    model_dir: Path | None = None,
    baseline: bool = False,
    out: Path | None = None,
    data: Path | None = None,
    device: str | None = None,
    track: bool = True,
) -> EvaluateResult:
    """Evaluate a model folder on the held-out test split: metrics.json (flat keys, DVC metrics), predictions.csv
    (one row per image, for paired comparisons), confusion.json and plots; logged into the model's training run."""
    import torch

    from vitops.flows import tracking
    from vitops.vit.bundle import load_bundle
    from vitops.vit.evaluate import compute_metrics, confusion, plot_confusion, plot_reliability

    kind = "baseline" if baseline else "vit"
    model_dir = Path(model_dir or (params.baseline.out_dir if baseline else params.train.out_dir) / "model")
    out = Path(out or params.evaluate.out_dir / kind)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_bundle(model_dir, device=device)
    probs, labels, paths = predict_split(params, model, meta, "test", Path(data or params.data.raw_dir), device)
    metrics = compute_metrics(probs, labels, meta.classes, params.evaluate.ece_bins)
    matrix = confusion(probs, labels, meta.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "confusion.json", {"classes": meta.classes, "matrix": matrix.tolist()})
    predictions = write_predictions(out / PREDICTIONS_FILE, paths, labels, probs, meta.classes)
    provenance = {"model_dir": str(model_dir), "weights_sha256": sha256_file(model_dir / "weights.safetensors")}
    atomic_write_json(out / "provenance.json", provenance | {"data_version": meta.extra.get("data_version")})
    plots = [
        plot_confusion(matrix, meta.classes, out / "confusion_matrix.png", title=f"{meta.model} on the test split"),
        plot_reliability(probs, labels, out / "reliability.png", bins=params.evaluate.ece_bins),
    ]
    run_id = None
    if track:
        tracking.configure(params.tracking.uri, params.tracking.experiment)
        tags = {"stage": "evaluate", "kind": kind, "model_dir": str(model_dir)}
        with tracking.start_or_resume_run(f"evaluate-{kind}", run_id=meta.extra.get("mlflow_run_id"), tags=tags) as run:
            run.log_metrics(metrics)
            for path in [*plots, out / "metrics.json", out / "confusion.json", predictions]:
                run.log_artifact(path, artifact_path="evaluation")
            run_id = run.run_id
    return EvaluateResult(kind, model_dir, out, metrics, predictions, plots, run_id)


def predict_split(params: Params, model: Any, meta: Any, split: str, root: Path, device: str) -> tuple[Any, Any, list]:
    """Probabilities, labels and image paths of one split of the validated data."""
    from torch.utils.data import DataLoader

    from vitops.vit.data import create_dataset
    from vitops.vit.evaluate import predict

    dataset = create_dataset(root, load_rows(params), meta, split, cache=False)
    loader = DataLoader(dataset, batch_size=params.train.batch_size, num_workers=params.train.workers)
    probs, labels = predict(model, loader, device)
    return probs, labels, list(dataset.paths)


def write_predictions(path: Path, paths: list[str], labels: Any, probs: Any, classes: list[str]) -> Path:
    """One row per image: path, label, prediction, confidence, correct (the input of paired comparisons)."""
    import pandas as pd

    from vitops.common.files import atomic_write

    pred = probs.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "path": paths,
            "label": [classes[i] for i in labels],
            "pred": [classes[i] for i in pred],
            "confidence": probs.max(axis=1).round(6),
            "correct": (pred == labels).astype(int),
        }
    )
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


# ---------------------------------------------------------------------------------------------------- engines


@dataclass
class ExportResult:
    path: Path
    exporter: str
    opset: int
    parity: dict[str, Any]
    reused: bool = False


def export(
    params: Params, model_dir: Path | None = None, out: Path | None = None, exporter: str | None = None
) -> ExportResult:
    """Export a model folder to ONNX and hold it to the parity gate; a failing gate leaves no file."""
    from vitops.flows.engines import export_checked_model

    return export_checked_model(params, model_folder(model_dir, params), Path(out or params.export.out), exporter)


@dataclass
class BuildResult:
    target: str  # tensorrt | onnxruntime | openvino | cpu (auto without TensorRT: every CPU engine)
    engines: list[Path]
    parity: dict[str, dict[str, Any]]
    onnx: ExportResult
    notice: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was not built or kept
    selection: dict[str, Any] | None = None  # deploy.selection.Selection: the engine to serve with, and why


def build(
    params: Params,
    model_dir: Path | None = None,
    target: str | None = None,
    precision: str | None = None,
    quantization: str | None = None,
) -> BuildResult:
    """Engines for the target (TensorRT on NVIDIA GPUs, ONNX Runtime and OpenVINO on CPUs), each behind its parity
    gate; exports first when the ONNX file is missing or stale. `auto` without CUDA builds every CPU engine this
    machine runs, says so (`notice`), and chooses the fastest that agrees enough (`selection`)."""
    from vitops.flows.engines import build_engines

    return build_engines(params, model_folder(model_dir, params), target, precision, quantization)


@dataclass
class BenchOutcome:
    out: Path
    table: str
    results: list[Any]  # deploy.latency.BenchResult per backend
    metrics: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    run_id: str | None = None


def bench(
    params: Params,
    model_dir: Path | None = None,
    out: Path | None = None,
    iters: int | None = None,
    device: str = "auto",
    track: bool = False,
) -> BenchOutcome:
    """Time torch and every built engine, like with like (on a GPU machine: torch CUDA against TensorRT, torch CPU
    against ONNX Runtime); write the JSON and table; log to MLflow (a new run with `track`, else an open one)."""
    from vitops.flows.engines import bench_model

    return bench_model(params, model_folder(model_dir, params), Path(out or params.bench.out), iters, device, track)


def model_folder(arg: Path | str | None, params: Params) -> Path:
    """The model folder named by the caller, or the one training wrote."""
    path = Path(arg) if arg else params.train.out_dir / "model"
    if not (path / "model.json").is_file() and (path / "model" / "model.json").is_file():
        path = path / "model"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no model folder here; train one with `vitops train` or name one")
    return path


# ---------------------------------------------------------------------------------------------------- gate, register


def gate(params: Params, model_dir: Path | None = None, track: bool = True) -> Any:
    """The three-KPI gate of a candidate against the champion (re-evaluated on today's test split) or the CNN
    baseline: accuracy uplift with its interval, latency on the target engine, monthly TCO. Returns a
    `flows.kpis.GateResult`; writes the report and `decision.json` beside it."""
    from vitops.flows.kpis import run_gate

    return run_gate(params, model_folder(model_dir, params), track)


def register(params: Params, model_dir: Path | None = None, flow_run_id: str = "") -> Any:
    """Register the gated candidate as a new version of `tracking.registered_model` (every evaluated candidate,
    so the history is complete) and point `candidate` at it only when the gate passed. Returns a
    `flows.kpis.RegisterResult`."""
    from vitops.flows.kpis import run_register

    return run_register(params, model_folder(model_dir, params), flow_run_id)
