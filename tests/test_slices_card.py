"""Per-class and slice accuracy with Wilson intervals and the worst flagged; the model card's fields are present."""

from __future__ import annotations

import pandas as pd
import pytest

from vitops.deploy.slices import image_attributes, markdown_slices, slice_metrics
from vitops.flows.model_card import CardFacts, known_limits, model_card


def _predictions() -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = [f"line{1 + (i % 2)}/{c}/img_{i}.png" for c in ("a", "b") for i in range(10)]
    correct = [1] * 10 + [1, 0] * 5  # class b: 5/10; folder line1 (even i): b always right
    preds = pd.DataFrame({"path": paths, "label": ["a"] * 10 + ["b"] * 10, "correct": correct})
    manifest = pd.DataFrame({"path": paths, "width": [32] * 18 + [64] * 2, "height": [32] * 18 + [48] * 2})
    return preds, manifest


def test_classes_and_slices_with_intervals_and_the_worst_flagged() -> None:
    preds, manifest = _predictions()
    metadata = pd.DataFrame({"path": preds["path"][:4], "camera": ["cam-1", "cam-2"] * 2})
    attributes = image_attributes(list(preds["path"]), manifest, metadata, ("size", "folder", "camera"))
    assert set(attributes.columns) == {"path", "size", "folder", "camera"}
    assert list(attributes["size"][-2:]) == ["64x48", "64x48"] and attributes["folder"][0] == "line1"
    assert attributes["camera"].iloc[-1] == "unknown"
    result = slice_metrics(preds, attributes, confidence=0.95, min_images=5)
    worst_class = result["worst_class"]
    assert worst_class["value"] == "b" and worst_class["top1"] == 0.5 and worst_class["n"] == 10
    assert 0.2 < worst_class["low"] < 0.5 < worst_class["high"] < 0.8  # Wilson, inside [0, 1]
    worst_slice = result["worst_slice"]
    assert worst_slice["attribute"] == "folder" and worst_slice["value"] == "line2" and worst_slice["top1"] == 0.5
    assert all(g["n"] >= 5 for g in (worst_class, worst_slice))
    text = markdown_slices(result)
    assert "**worst class**: class b: 50.00 % (5/10" in text and "**worst slice**: folder line2" in text
    with pytest.raises(ValueError, match="neither size, folder"):
        image_attributes(list(preds["path"]), manifest, None, ("lens",))


def test_a_slice_that_does_not_split_the_data_is_never_the_worst() -> None:
    preds, manifest = _predictions()
    attributes = image_attributes(list(preds["path"]), manifest.assign(width=32, height=32), None, ("size",))
    assert slice_metrics(preds, attributes)["worst_slice"] is None


def _decision() -> dict:
    check = {"kpi": "robustness", "name": "worst_drop", "passed": False, "value": 40.0, "threshold": 5.0,
             "reason": "candidate loses +40.00 points under resize"}  # fmt: skip
    return {
        "passed": False,
        "decision": {"summary": "failed 1 of 6 checks: robustness worst_drop 40 > 5", "checks": [check]},
        "uplift": {"n": 192, "candidate_top1": 0.99479, "confidence": 0.95},
        "candidate": {"robustness": {"clean": 0.995, "resize": 0.595, "blur": 0.99}},
        "kpi_table_markdown": "| KPI | candidate |\n|---|---|\n| top-1 | 99.48 % |",
        "review": {
            "Robustness": "| corruption | severity |\n|---|---|\n| resize | 0.25 |",
            "Classes and slices": "- **worst class**: class 9: 95.24 %",
        },  # fmt: skip
        "slices": {
            "worst_class": {
                "attribute": "class",
                "value": "9",
                "correct": 20,
                "n": 21,
                "top1": 0.952,
                "low": 0.77,
                "high": 0.99,
            },
            "worst_slice": None,
        },  # fmt: skip
    }


def test_the_model_card_has_every_field() -> None:
    facts = {"model": "vitops-vit", "version": "3", "data_version": "abc.dir", "git_commit": "1234567",
             "params_hash": "feed", "validation": "data gate passed: 1797 files"}  # fmt: skip
    card = CardFacts(
        "Sorting digits at station 4",
        "Letters",
        ("only daylight images",),
        {"epochs": 10, "rotate_deg": 12.0},
        {"model": "vit_tiny_patch16_224", "img_size": 32, "extra": {"kind": "vit", "epochs_run": 10}},
    )
    balance = {"0": {"train": 140, "val": 18, "test": 20}, "1": {"train": 145, "val": 17, "test": 20}}
    text = model_card(_decision(), facts, card, balance, {"approval.approver": "ana", "approval.decision": "approved"})
    for heading in ("Intended use", "Data", "Training recipe", "KPIs", "Robustness", "Classes and slices",
                    "Known limits", "Approvals"):  # fmt: skip
        assert f"## {heading}" in text, heading
    assert text.startswith("# Model card: vitops-vit version 3")
    assert "Sorting digits at station 4" in text and "Out of scope: Letters" in text
    assert "data version `abc.dir`" in text and "| 0 | 140 | 18 | 20 | 178 |" in text and "Imbalance" in text
    assert "- rotate_deg: `12.0`" in text and "architecture `vit_tiny_patch16_224`" in text
    assert "test top-1 99.48 % (191/192, 95% CI" in text
    assert "| resize | 0.25 |" in text and "worst class" in text
    assert "- approver: ana" in text
    limits = known_limits(_decision(), card)
    assert limits[0] == "only daylight images"
    assert any(line.startswith("failed robustness/worst_drop") for line in limits)
    assert any("under resize: top-1 59.50 %" in line for line in limits)
    assert any("192 test images" in line for line in limits)
    no_approvals = model_card(_decision(), facts, card, {}, None)
    assert "none when this card was written" in no_approvals and "class balance unknown" in no_approvals
