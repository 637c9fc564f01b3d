"""The corruption suite is deterministic and changes the images; a model trained without augmentation on a planted
texture cue fails the KPI gate's robustness check; the checks, the KPI rows and the augmentation that covers it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitops.deploy.kpi import Cost, Latency, ModelKpis, decide
from vitops.deploy.review import check_robustness, check_worst_class, drops, review_rows, robustness_markdown
from vitops.vit.augment import BatchAugment, Normalise
from vitops.vit.robustness import CORRUPTIONS, Severities, corrupt, corruption_suite, robustness_top1


def _batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


def test_the_suite_is_deterministic_keeps_shape_and_changes_every_image() -> None:
    images = _batch()
    first, second = corruption_suite(images, Severities()), corruption_suite(images.clone(), Severities())
    assert list(first) == list(CORRUPTIONS)
    for name in CORRUPTIONS:
        assert first[name].dtype == torch.uint8 and first[name].shape == images.shape
        assert torch.equal(first[name], second[name]), name
        assert not torch.equal(first[name], images), name
    other_seed = corrupt(images, "noise", 0.05, seed=1)
    assert not torch.equal(other_seed, first["noise"])


def test_severities_leave_out_what_is_null_and_unknown_names_fail() -> None:
    assert list(Severities(jpeg=None, shift=None).active()) == [c for c in CORRUPTIONS if c not in ("jpeg", "shift")]
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(_batch(), "fog", 1.0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(_batch().float(), "blur", 1.0)


def _texture_task(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Class 1: a fine one-pixel checkerboard; class 0: flat grey of the same mean. Blur erases the only cue."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:32, :32]
    checker = ((yy + xx) % 2 * 120 + 68).astype(np.float64)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        base = checker if label else np.full((32, 32), 128.0)
        images[i] = np.clip(base + rng.normal(0, 4, (32, 32)), 0, 255).astype(np.uint8)[None]
    return torch.from_numpy(images), labels


def _kpis(label: str, robustness: dict[str, float] | None) -> ModelKpis:
    cost = Cost("USD", 0.1, 100.0, 0.4, 1.0, 1.6, 2.0, 300.0, 303.6)
    return ModelKpis(label, 1.0, Latency("onnxruntime-fp32", 1.0, 2.0, 3.0, 100.0), cost, robustness)


def test_a_model_trained_without_augmentation_fails_the_robustness_check() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=2)
    normalise = Normalise((0.5,) * 3, (0.5,) * 3)
    images, labels = _texture_task(64, 0)
    x, y = normalise(images), torch.as_tensor(labels)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(60):  # no augmentation: the clean images only
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    test, test_labels = _texture_task(40, 1)
    top1 = robustness_top1(model, test, test_labels, normalise, Severities(seed=0))
    assert top1["clean"] == 1.0
    assert top1["blur"] <= 0.6  # the planted cue is gone: about chance
    checks = check_robustness(_kpis("candidate", top1), None, 5.0, 2.0)
    assert [c.name for c in checks] == ["worst_drop", "mean_drop"]
    assert not decide(checks).passed
    assert checks[0].value == pytest.approx(max(drops(top1).values()))
    assert "under" in checks[0].reason and "gate.max_robustness_drop_points" in checks[0].reason


def test_checks_pass_within_limits_are_off_with_none_and_name_the_reference() -> None:
    cand = _kpis("candidate", {"clean": 1.0, "blur": 0.98, "jpeg": 0.99})
    ref = _kpis("baseline resnet10t", {"clean": 0.99, "blur": 0.5, "jpeg": 0.97})
    checks = check_robustness(cand, ref, 5.0, 2.0)
    assert all(c.passed for c in checks)
    assert checks[0].value == pytest.approx(2.0) and "baseline resnet10t: +49.00" in checks[0].reason
    assert checks[1].value == pytest.approx(1.5)
    assert check_robustness(cand, ref, None, None) == []
    with pytest.raises(ValueError, match="no robustness results"):
        check_robustness(_kpis("candidate", None), ref, 5.0, None)
    rows = review_rows(cand, ref, decide(checks))
    names = ["top-1 under blur", "top-1 under jpeg", "robustness worst drop", "robustness mean drop"]
    assert [r[0] for r in rows] == names
    assert rows[0][1:3] == ["98.00 %", "50.00 %"] and rows[2][3:] == ["<= 5 pts", "PASS"]
    table = robustness_markdown(cand, ref, {"blur": 0.8, "jpeg": 30})
    assert "| blur | 0.8 | 98.00 % | +2.00 | 50.00 % | +49.00 |" in table


def test_worst_class_floor() -> None:
    sliced = {"worst_class": {"attribute": "class", "value": "7", "correct": 15, "n": 20, "top1": 0.75,
                              "low": 0.53, "high": 0.89}}  # fmt: skip
    (check,) = check_worst_class(sliced, 0.9, "candidate")
    assert not check.passed and "worst class 7" in check.reason and "75.00 %" in check.reason
    assert check_worst_class(sliced, None, "candidate") == []
    assert decide([check]).summary() == "failed 1 of 1 checks: class worst_class_top1 0.75 < 0.9"


def test_the_augmentation_draws_the_camera_settings_per_image_and_is_seeded() -> None:
    images = _batch(8)
    sizes = torch.full((8, 2), 32)
    augment = BatchAugment(32, "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0, 0.0, 0.0, 0.0, 10.0, 1.0, 1.2, 0.06, 1.0, 0.2)
    plain = BatchAugment(32, "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0)
    a = augment(images, sizes, torch.Generator().manual_seed(3))
    b = augment(images, sizes, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32)
    assert not torch.equal(a, plain(images, sizes, torch.Generator().manual_seed(3)))
