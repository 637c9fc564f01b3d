"""Held-out evaluation the way a reviewer reads it: accuracy, per-class scores, confusion and calibration.

`predict` runs a model over a loader; `compute_metrics` turns probabilities and labels into a flat metrics
mapping (DVC `metrics:` friendly: top-1, top-5 when there are more than five classes, macro and per-class
precision/recall/F1 from scikit-learn, NLL, and the expected calibration error); `plot_confusion` and
`plot_reliability` draw the PNGs with matplotlib's Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and labels (N,) of everything in `loader`."""
    model.eval().to(device)
    probs, labels = [], []
    for images, targets in loader:
        logits = model(images.to(device)).float()
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Confidence histogram for the reliability diagram and ECE (equal-width bins over the top-1 confidence).

    Returns:
        `edges` (bins + 1), per-bin `confidence`, `accuracy` (NaN for empty bins) and `count`.
    """
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=conf, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=bins) / count
    return {"edges": edges, "confidence": confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    cal = calibration_bins(probs, labels, bins)
    used = cal["count"] > 0
    gaps = np.abs(cal["accuracy"][used] - cal["confidence"][used])
    return float((gaps * cal["count"][used]).sum() / max(cal["count"].sum(), 1.0))


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], ece_bins: int = 15, prefix: str = "test_"
) -> dict[str, float]:
    """Flat metrics of predictions on a labelled split.

    Returns:
        `<prefix>top1`, `<prefix>top5` (only with more than five classes), `<prefix>nll`, `<prefix>ece`,
        `<prefix>count`, macro precision/recall/F1, and `<prefix>precision/<class>` (recall, f1, support likewise).
    """
    from sklearn.metrics import precision_recall_fscore_support

    n, num_classes = probs.shape
    pred = probs.argmax(axis=1)
    out: dict[str, float] = {f"{prefix}count": float(n), f"{prefix}top1": float((pred == labels).mean()) if n else 0.0}
    if num_classes > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        out[f"{prefix}top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    out[f"{prefix}nll"] = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1.0)).mean()) if n else 0.0
    out[f"{prefix}ece"] = expected_calibration_error(probs, labels, ece_bins)
    ids = list(range(num_classes))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(labels, pred, labels=ids, average="macro", zero_division=0)
    out.update(
        {f"{prefix}macro_precision": float(mp), f"{prefix}macro_recall": float(mr), f"{prefix}macro_f1": float(mf)}
    )
    for i, name in enumerate(classes):
        out[f"{prefix}precision/{name}"] = float(p[i])
        out[f"{prefix}recall/{name}"] = float(r[i])
        out[f"{prefix}f1/{name}"] = float(f[i])
        out[f"{prefix}support/{name}"] = float(s[i])
    return out


def confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(num_classes)))


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], out: Path, title: str = "Confusion matrix") -> Path:
    """Draw the confusion matrix (counts, rows normalised for colour) as a PNG."""
    plt = _pyplot()
    size = min(4 + 0.35 * len(classes), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(ticks, labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        for i, j in np.ndindex(matrix.shape):
            if matrix[i, j]:
                ax.text(
                    j, i, str(matrix[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black"
                )
    return _save(fig, out)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, out: Path, bins: int = 15) -> Path:
    """Draw the reliability diagram (accuracy against confidence per bin) with the ECE in the title."""
    plt = _pyplot()
    cal = calibration_bins(probs, labels, bins)
    centers = (cal["edges"][:-1] + cal["edges"][1:]) / 2
    width = 1.0 / bins
    fig, ax = plt.subplots(figsize=(5, 5))
    acc = np.nan_to_num(cal["accuracy"])
    ax.bar(centers, acc, width=width, edgecolor="black", label="accuracy")
    ax.bar(
        centers, np.nan_to_num(cal["confidence"]) - acc, bottom=acc, width=width, color="red", alpha=0.3, label="gap"
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {expected_calibration_error(probs, labels, bins):.3f})")
    ax.legend(loc="upper left")
    return _save(fig, out)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
