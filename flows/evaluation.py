"""The evaluation stage: a model folder on the held-out test split.

evaluate(model_dir, dataset, out, kind=...)   metrics.json (flat keys, DVC metrics), predictions.csv (one
                                              row per image, for paired comparisons), confusion.json,
                                              provenance.json and plots, logged into the model's training run
                                                                                        -> EvaluateResult
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write, atomic_write_json, sha256_file
from vitops.flows import tracking
from vitops.flows.config import Params
from vitops.flows.settings import Dataset
from vitops.flows.tracking import RunContext

PREDICTIONS_FILE = "predictions.csv"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class EvalSettings:
    """How the test split is read and scored: the data loader's batch size and workers (`train` of params.yaml)
    and the calibration bins (`evaluate.ece_bins`)."""

    batch_size: int = 64
    workers: int = 0
    ece_bins: int = 15

    @classmethod
    def from_params(cls, params: Params) -> EvalSettings:
        return cls(params.train.batch_size, params.train.workers, params.evaluate.ece_bins)


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
    model_dir: Path,
    dataset: Dataset,
    out: Path,
    kind: str = "vit",
    settings: EvalSettings = EvalSettings(),
    device: str | None = None,
    run: RunContext | None = None,
) -> EvaluateResult:
    """Evaluate a model folder on the test split of `dataset`; log into the model's training run, or a new run
    under `run` (None: no tracking).

    Args:
        kind: `vit` or `baseline`, recorded with the results.
        settings: the data loader's batch size and workers, the calibration bins.
    """
    import torch

    from vitops.vit.bundle import load_bundle
    from vitops.vit.evaluate import compute_metrics, confusion, plot_confusion, plot_reliability

    model_dir, out = Path(model_dir), Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_bundle(model_dir, device=device)
    probs, labels, paths = predict_split(model, meta, dataset, "test", device, settings.batch_size, settings.workers)
    metrics = compute_metrics(probs, labels, meta.classes, settings.ece_bins)
    matrix = confusion(probs, labels, meta.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "confusion.json", {"classes": meta.classes, "matrix": matrix.tolist()})
    predictions = write_predictions(out / PREDICTIONS_FILE, paths, labels, probs, meta.classes)
    provenance = {"model_dir": str(model_dir), "weights_sha256": sha256_file(model_dir / "weights.safetensors")}
    atomic_write_json(out / PROVENANCE_FILE, provenance | {"data_version": meta.extra.get("data_version")})
    plots = [
        plot_confusion(matrix, meta.classes, out / "confusion_matrix.png", title=f"{meta.model} on the test split"),
        plot_reliability(probs, labels, out / "reliability.png", bins=settings.ece_bins),
    ]
    run_id = None
    if run is not None:
        run.configure()
        tags = {"stage": "evaluate", "kind": kind, "model_dir": str(model_dir)}
        train_run = meta.extra.get("mlflow_run_id")
        with tracking.start_or_resume_run(
            f"evaluate-{kind}", run_id=train_run, tags=tags, parent_run_id=run.parent_run_id
        ) as handle:
            handle.log_metrics(metrics)
            for path in [*plots, out / "metrics.json", out / "confusion.json", predictions]:
                handle.log_artifact(path, artifact_path="evaluation")
            run_id = handle.run_id
    return EvaluateResult(kind, model_dir, out, metrics, predictions, plots, run_id)


def predict_split(
    model: Any, meta: Any, dataset: Dataset, split: str, device: str, batch_size: int = 64, workers: int = 0
) -> tuple[Any, Any, list]:
    """Probabilities, labels and image paths of one split of the validated data."""
    from torch.utils.data import DataLoader

    from vitops.vit.data import create_dataset
    from vitops.vit.evaluate import predict

    images = create_dataset(dataset.root, dataset.rows(), meta, split)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
    probs, labels = predict(model, loader, device)
    return probs, labels, list(images.paths)


def write_predictions(path: Path, paths: list[str], labels: Any, probs: Any, classes: list[str]) -> Path:
    """One row per image: path, label, prediction, confidence, correct (the input of paired comparisons)."""
    import pandas as pd

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
