"""Evaluation metrics and plots on known predictions; the stand-in checkpoint is labelled and loadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitops.vit.evaluate import (
    compute_metrics,
    confusion,
    expected_calibration_error,
    plot_confusion,
    plot_reliability,
)


def _onehot(labels: list[int], classes: int, conf: float) -> np.ndarray:
    probs = np.full((len(labels), classes), (1 - conf) / (classes - 1))
    probs[np.arange(len(labels)), labels] = conf
    return probs


def test_perfect_confident_predictions() -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 6])
    probs = _onehot(labels.tolist(), 7, 1.0)
    m = compute_metrics(probs, labels, [f"c{i}" for i in range(7)])
    assert m["test_top1"] == m["test_top5"] == m["test_macro_f1"] == 1.0
    assert m["test_ece"] == pytest.approx(0.0)
    assert m["test_support/c6"] == 2.0 and m["test_count"] == 8.0


def test_top5_only_with_more_than_five_classes_and_per_class_scores() -> None:
    labels = np.array([0, 0, 1, 2])
    preds = [0, 1, 1, 2]  # one class-0 image predicted as class 1
    m = compute_metrics(_onehot(preds, 3, 0.9), labels, ["a", "b", "c"])
    assert "test_top5" not in m
    assert m["test_top1"] == 0.75
    assert m["test_recall/a"] == 0.5 and m["test_precision/b"] == 0.5 and m["test_f1/c"] == 1.0
    assert confusion(_onehot(preds, 3, 0.9), labels, 3).tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_ece_measures_overconfidence() -> None:
    labels = np.array([0, 1] * 50)
    probs = _onehot([0] * 100, 2, 0.9)  # always 90% sure of class 0, right half the time
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.4)


def test_plots_are_pngs(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 1])
    probs = _onehot([0, 1, 1, 1], 3, 0.7)
    for path in (
        plot_confusion(confusion(probs, labels, 3), ["a", "b", "c"], tmp_path / "cm.png"),
        plot_reliability(probs, labels, tmp_path / "rel.png"),
    ):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_standin_checkpoint_is_labelled_and_fine_tunes_through_file_source(tmp_path: Path) -> None:
    from safetensors import safe_open

    from vitops.vit.sources import create_model
    from vitops.vit.standin import CHARSET, StandinSpec, pretrain_standin, render_characters

    images, labels = render_characters(8, 32, seed=3)
    again, _ = render_characters(8, 32, seed=3)
    assert images.shape == (8, 32, 32) and np.array_equal(images, again) and labels.max() < len(CHARSET)

    out = tmp_path / "standin.safetensors"
    spec = StandinSpec(patch_size=8, depth=1, images=128, epochs=1, batch_size=64)
    info = pretrain_standin(spec, out, show_progress=False)
    assert "NOT public pretrained weights" in info["notice"]
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["vitops_standin"] == "true"
    assert out.with_suffix(".json").is_file()
    model, _, _ = create_model(f"file:{out}", spec.model, 10, 32, {"patch_size": 8, "depth": 1})
    assert model.head.out_features == 10
