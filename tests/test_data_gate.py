"""The data gate with real Great Expectations: planted problems are rejected with actionable reasons, unusual but
valid files pass, class checks fail the gate, drift only warns, and the report and Data Docs are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.data import build_leaky, build_planted, tree_digest, write_clean

from vitops.data_checks.gate import run_gate, validate_folder
from vitops.data_checks.manifest import load_usable, read_manifest, scan_dataset
from vitops.data_checks.sample import write_sample
from vitops.data_checks.suite import GateRules

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
RULES = GateRules(
    classes=("cat", "dog", "bird"), min_width=16, min_height=16, min_images_per_class=5, max_imbalance_ratio=3.0
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("planted")
    root = base / "data"
    problems, unusual = build_planted(root, base / "outside")
    before = tree_digest(root)
    out = base / "out"
    report = validate_folder(root, RULES, FRACTIONS, out / "manifest.csv", out / "report.json", workers=2)
    return {"root": root, "out": out, "report": report, "problems": problems, "unusual": unusual, "before": before}


def test_every_planted_problem_is_rejected_with_its_reason(planted: dict) -> None:
    rejected = {item["path"]: item["reason"] for item in planted["report"]["rejected"]}
    for path, phrase in planted["problems"].items():
        assert path in rejected, f"{path} was not rejected"
        assert phrase in rejected[path], f"{path}: {rejected[path]!r} does not say {phrase!r}"
    assert set(rejected) == set(planted["problems"]), "only the planted files are rejected"


def test_unusual_but_valid_files_pass(planted: dict) -> None:
    rejected = {item["path"] for item in planted["report"]["rejected"]}
    assert not rejected & set(planted["unusual"])
    manifest = read_manifest(planted["out"] / "manifest.csv").set_index("path")
    assert manifest.loc["cat/cmyk.jpg", "mode"] == "CMYK"
    assert manifest.loc["cat/sixteen.png", "mode"].startswith("I;16")
    assert manifest.loc["cat/palette.png", "mode"] == "P"
    rotated = manifest.loc["cat/rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (20, 40), "size is reported after EXIF rotation"
    assert manifest.loc["dog/ñandú 猫.png", "label"] == "dog"


def test_clutter_is_skipped_quietly_and_links_are_not_followed(planted: dict) -> None:
    manifest = read_manifest(planted["out"] / "manifest.csv").set_index("path")
    assert not [p for p in manifest.index if "DS_Store" in p or "Thumbs" in p or "MACOSX" in p or "/." in p]
    assert not [p for p in manifest.index if p.startswith(".")]
    for link in ("dog/link.png", "dog/linkdir"):
        assert manifest.loc[link, "sha256"] == "", "a link target must never be read"
    assert "dog/linkdir/x.png" not in manifest.index


def test_class_checks_fail_the_gate_with_reasons(planted: dict) -> None:
    report = planted["report"]
    assert report["passed"] is False
    text = "\n".join(report["failures"])
    assert "'bird'" in text and "no usable image" in text  # missing class
    assert "'dog' (4)" in text and "min_images_per_class=5" in text  # too few
    assert "imbalance 3.2:1" in text and "max_imbalance_ratio=3.0" in text
    assert report["counts"]["labels"] == {"cat": 13, "dog": 4, "bird": 0}


def test_report_format_and_data_docs(planted: dict) -> None:
    report = json.loads((planted["out"] / "report.json").read_text(encoding="utf-8"))
    assert set(report) >= {"passed", "rejected", "expectations", "warnings", "failures", "counts", "data_docs"}
    for entry in report["expectations"]:
        assert set(entry) >= {"suite", "name", "column", "success", "severity", "observed"}
    assert {e["name"] for e in report["expectations"]} >= {
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_between",
        "expect_column_distinct_values_to_contain_set",
    }
    docs = Path(report["data_docs"])
    assert docs == planted["out"] / "data_docs" / "index.html" and docs.is_file()
    assert list((docs.parent / "validations").rglob("*.html"))


def test_nothing_is_moved_or_deleted_and_later_stages_skip_rejected(planted: dict) -> None:
    assert tree_digest(planted["root"]) == planted["before"]
    usable = load_usable(planted["out"] / "manifest.csv", planted["out"] / "report.json")
    rejected = {item["path"] for item in planted["report"]["rejected"]}
    assert len(usable) == 17 and not set(usable["path"]) & rejected
    assert set(usable["split"]) <= {"train", "val", "test"}


def test_same_image_in_two_splits_is_leakage(tmp_path: Path) -> None:
    leak = build_leaky(tmp_path / "data")
    manifest = scan_dataset(tmp_path / "data", FRACTIONS, workers=1)
    assert set(manifest["split"]) == {"train", "val"}, "a pre-split folder keeps its own splits"
    report = run_gate(manifest, GateRules(min_images_per_class=2))
    assert [item["path"] for item in report["rejected"]] == [leak]
    assert "train (train/a/train_000.png)" in report["rejected"][0]["reason"]
    assert report["passed"] is False


def test_rejected_fraction_can_be_allowed(tmp_path: Path) -> None:
    write_clean(tmp_path, {"a": 10, "b": 10})
    (tmp_path / "a" / "broken.png").write_bytes(b"oops")
    manifest = scan_dataset(tmp_path, FRACTIONS, workers=1)
    assert run_gate(manifest, GateRules())["passed"] is False
    report = run_gate(manifest, GateRules(max_rejected_fraction=0.1))
    assert report["passed"] is True and [r["path"] for r in report["rejected"]] == ["a/broken.png"]


def test_drift_is_a_warning_that_does_not_fail(tmp_path: Path) -> None:
    write_sample(tmp_path / "ref", size=100)
    reference = scan_dataset(tmp_path / "ref", FRACTIONS, workers=1)
    same = run_gate(reference, GateRules(), reference=reference)
    assert same["passed"] and not same["warnings"]

    from PIL import Image, ImageOps

    for path in (tmp_path / "ref").rglob("*.png"):  # inverted digits: same labels, very different pixels
        dest = tmp_path / "new" / path.relative_to(tmp_path / "ref")
        dest.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path)).save(dest)
    current = scan_dataset(tmp_path / "new", FRACTIONS, workers=1)
    report = run_gate(current, GateRules(), reference=reference)
    assert report["passed"] is True
    drift = [e for e in report["expectations"] if e["suite"] == "drift"]
    assert drift and all(e["severity"] == "warning" for e in drift)
    assert any("drift in mean_r" in w for w in report["warnings"])
    assert not any("drift in label" in w for w in report["warnings"])
