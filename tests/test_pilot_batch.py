"""The data gate of a pilot batch and the quickstart's line batch, with real Great Expectations: labels come from
class folders or `unlabelled/`, broken files are rejected with reasons and never changed, the rejected share
decides, the line batch drifts in its channel statistics while held-out sample images do not, and the line batch
is deterministic, held out of the sample's train split and never a copy of a sample image."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.data import noise_image, tree_digest, write_clean, write_png
from PIL import Image

from vitops.data_checks.batch import BatchError, check_batch, scan_batch, validate_batch
from vitops.data_checks.manifest import COLUMNS, load_usable, read_manifest, scan_dataset, write_manifest
from vitops.data_checks.sample import SampleError, write_line_batch, write_sample
from vitops.data_checks.suite import GateRules
from vitops.flows.cli import main

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
RULES = GateRules(classes=("cat", "dog", "bird"), min_width=16, min_height=16)
DIGITS = GateRules(classes=tuple(str(d) for d in range(10)))


def _run(root: Path, out: Path, rules: GateRules = RULES, reference: Path | None = None) -> dict:
    return validate_batch(root, rules, out / "report.json", out / "manifest.csv", reference_path=reference, workers=1)


def _bytes_and_mtimes(root: Path) -> dict[str, tuple[str, int]]:
    """Path -> (sha256 or link target, mtime) of every file, link and folder under `root`, links not followed."""
    digest = tree_digest(root)
    stamps = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            stamps[rel] = (digest.get(rel, "folder"), os.lstat(full).st_mtime_ns)
    return stamps


def test_clean_mixed_batch(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    write_clean(root, {"cat": 3, "dog": 2})
    write_png(root / "unlabelled" / "u1.png", 50)
    write_png(root / "unlabelled" / "night" / "u2.png", 51)
    write_png(root / "loose.png", 52)
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / "._img_000.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "unlabelled" / "Thumbs.db").write_bytes(b"thumbs")

    report = _run(root, tmp_path / "out")
    assert report["passed"] is True and report["rejected"] == [] and report["failures"] == []
    assert report["counts"] == {
        "files": 8,
        "usable": 8,
        "rejected": 0,
        "labelled": 5,
        "unlabelled": 3,
        "labels": {"cat": 3, "dog": 2, "bird": 0},
    }
    usable = [(u["path"], u["label"]) for u in report["usable"]]
    assert usable == [
        ("cat/img_000.png", "cat"),
        ("cat/img_001.png", "cat"),
        ("cat/img_002.png", "cat"),
        ("dog/img_000.png", "dog"),
        ("dog/img_001.png", "dog"),
        ("loose.png", ""),
        ("unlabelled/night/u2.png", ""),
        ("unlabelled/u1.png", ""),
    ]
    assert report["usable"][0]["sha256"] == hashlib.sha256((root / "cat" / "img_000.png").read_bytes()).hexdigest()

    manifest = read_manifest(tmp_path / "out" / "manifest.csv")
    assert list(manifest.columns) == list(COLUMNS) and set(manifest["split"]) == {"batch"}
    assert len(load_usable(tmp_path / "out" / "manifest.csv", tmp_path / "out" / "report.json")) == 8
    written = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert written["data_root"] == str(root) and written["reference"] is None
    assert Path(written["data_docs"]).is_file()


def _png(seed: int, size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    noise_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("broken")
    root = base / "batch"
    write_clean(root, {"cat": 4, "dog": 4}, seed=400)
    write_png(root / "unlabelled" / "u.png", 550)
    planted = {
        "cat/truncated.png": (_png(501)[:60], "truncated"),
        "dog/notes.png": (b"these are my notes, not an image\n", "not an image"),
        "unlabelled/empty.png": (b"", "empty file"),
        "tiny.png": (_png(502, (6, 6)), "smaller than the minimum"),
        "zebra/z.png": (_png(503), "folder 'zebra' is not one of the model's classes"),
        "Cat/upper.png": (_png(504), "folder 'Cat' is not one of the model's classes"),
        "cat/same.png": (_png(505), "also labelled 'dog'"),
        "dog/same.png": (_png(505), "also labelled 'cat'"),
    }
    for rel, (data, _) in planted.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "unlabelled" / "copy.png").write_bytes((root / "cat" / "img_000.png").read_bytes())
    (root / "zebra" / "twin.png").write_bytes((root / "dog" / "img_001.png").read_bytes())
    planted["zebra/twin.png"] = (b"", "folder 'zebra'")
    write_png(base / "outside" / "secret.png", 506)
    os.symlink(base / "outside" / "secret.png", root / "cat" / "link.png")
    os.symlink(base / "outside", root / "unlabelled" / "linkdir")
    planted["cat/link.png"] = (b"", "symbolic link")
    planted["unlabelled/linkdir"] = (b"", "symbolic link")
    before = _bytes_and_mtimes(root)
    report = _run(root, base / "out")
    return {"root": root, "out": base / "out", "report": report, "planted": planted, "before": before}


def test_broken_files_are_rejected_with_reasons_and_the_rest_is_usable(broken: dict) -> None:
    report = broken["report"]
    rejected = {item["path"]: item["reason"] for item in report["rejected"]}
    assert set(rejected) == set(broken["planted"])
    for path, (_, phrase) in broken["planted"].items():
        assert phrase in rejected[path], f"{path}: {rejected[path]!r} does not say {phrase!r}"
    assert "['cat', 'dog', 'bird']" in rejected["zebra/z.png"] and "unlabelled/" in rejected["zebra/z.png"]
    usable = {u["path"] for u in report["usable"]}
    assert usable == {f"{c}/img_{i:03d}.png" for c in ("cat", "dog") for i in range(4)} | {
        "unlabelled/u.png",
        "unlabelled/copy.png",
    }, "an image both labelled and unlabelled is no label conflict"
    assert any("exact copies" in w for w in report["warnings"])
    assert report["counts"]["files"] == 21 and report["counts"]["rejected"] == 11
    assert report["passed"] is False
    assert any("11 of 21 files (52%) were rejected" in f for f in report["failures"])
    usable_rows = load_usable(broken["out"] / "manifest.csv", broken["out"] / "report.json")
    assert set(usable_rows["path"]) == usable


def test_no_file_of_the_batch_is_changed_and_links_are_not_read(broken: dict) -> None:
    assert _bytes_and_mtimes(broken["root"]) == broken["before"]
    manifest = read_manifest(broken["out"] / "manifest.csv").set_index("path")
    assert manifest.loc["cat/link.png", "sha256"] == "" and manifest.loc["unlabelled/linkdir", "sha256"] == ""
    assert "unlabelled/linkdir/secret.png" not in manifest.index


def test_the_rejected_share_decides(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    write_clean(root, {"cat": 2, "dog": 2})
    (root / "unlabelled").mkdir()
    (root / "unlabelled" / "broken.png").write_bytes(b"oops")
    manifest = scan_batch(root, workers=1)
    strict = check_batch(manifest, RULES)
    assert strict["passed"] is False and "1 of 5 files (20%) were rejected" in strict["failures"][0]
    lenient = check_batch(manifest, dataclasses.replace(RULES, max_rejected_fraction=0.2))
    assert lenient["passed"] is True and [r["path"] for r in lenient["rejected"]] == ["unlabelled/broken.png"]
    assert lenient["counts"]["usable"] == 4

    only_bad = scan_batch(root / "unlabelled", workers=1)
    report = check_batch(only_bad, dataclasses.replace(RULES, max_rejected_fraction=1.0))
    assert report["passed"] is False and "no usable images" in report["failures"][0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The full digits sample, its manifest (the training data's reference) and the line batch."""
    base = tmp_path_factory.mktemp("digits")
    sample = base / "sample"
    write_sample(sample)
    manifest = scan_dataset(sample, FRACTIONS, workers=2)
    write_manifest(manifest, base / "manifest.csv")
    line = write_line_batch(base / "line")
    return {"base": base, "sample": sample, "manifest": manifest, "line": line}


def test_line_batch_drifts_and_held_out_sample_images_do_not(digits: dict) -> None:
    base = digits["base"]
    report = _run(base / "line", base / "line_out", DIGITS, reference=base / "manifest.csv")
    assert report["passed"] is True and report["counts"]["usable"] == len(digits["line"])
    assert any(w.startswith("drift in mean_r") for w in report["warnings"])
    assert any(w.startswith("drift in std_r") for w in report["warnings"])
    drift = [e for e in report["expectations"] if e["suite"] == "drift"]
    assert drift and all(e["severity"] == "warning" for e in drift)
    assert "label" not in {e["column"] for e in drift}, "no label drift for a partly unlabelled batch"

    held_out = base / "held_out"
    frame = digits["manifest"]
    for i, (rel, label) in enumerate(zip(frame["path"], frame["label"], strict=True)):
        if frame["split"].iloc[i] != "train":
            dest = held_out / (label if i % 2 else "unlabelled") / Path(rel).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(digits["sample"] / rel, dest)
    same = _run(held_out, base / "held_out_out", DIGITS, reference=base / "manifest.csv")
    assert same["passed"] is True and same["warnings"] == []
    assert [e for e in same["expectations"] if e["suite"] == "drift"]


def test_line_batch_is_deterministic_held_out_and_never_a_sample_copy(digits: dict, tmp_path: Path) -> None:
    base = digits["base"]
    again = write_line_batch(tmp_path / "again")
    assert tree_digest(tmp_path / "again") == tree_digest(base / "line")
    assert [p.relative_to(tmp_path / "again") for p in again] == [p.relative_to(base / "line") for p in digits["line"]]

    frame = digits["manifest"]
    held_out = {Path(p).stem.split("_")[1] for p, s in zip(frame["path"], frame["split"], strict=True) if s != "train"}
    bases = {p.stem.split("_")[1] for p in digits["line"]}
    assert bases == held_out, "the bases are exactly the sample images outside the train split"
    sample_hashes = set(frame["sha256"])
    assert not {hashlib.sha256(p.read_bytes()).hexdigest() for p in digits["line"]} & sample_hashes

    folders: dict[str, list[str]] = {}
    for p in digits["line"]:
        folders.setdefault(p.parent.name, []).append(p.stem)
    labelled = len(digits["line"]) - len(folders["unlabelled"])
    assert abs(labelled / len(digits["line"]) - 0.5) < 0.03
    labels = dict(zip(frame["path"].map(lambda p: Path(p).stem.split("_")[1]), frame["label"], strict=True))
    for digit in map(str, range(10)):
        per_class = [stem for stem in bases if labels[stem] == digit]
        assert abs(len(folders[digit]) - len(per_class) / 2) <= 1, f"class {digit} is not half labelled"
    with Image.open(digits["line"][0]) as img:
        assert img.size == (32, 32) and img.mode == "L"

    fifth = write_line_batch(tmp_path / "again", labelled_share=0.2)  # an earlier batch may be rewritten
    share = sum(p.parent.name != "unlabelled" for p in fifth) / len(fifth)
    assert abs(share - 0.2) < 0.03
    assert len(list((tmp_path / "again").rglob("*.png"))) == len(fifth), "files of the earlier batch are replaced"


def test_batch_and_sample_never_overwrite_each_other_or_user_files(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(SampleError, match="holds a vitops sample, not a line batch"):
        write_line_batch(digits["sample"])
    with pytest.raises(SampleError, match="holds a vitops line batch, not a sample"):
        write_sample(digits["base"] / "line", size=10)
    with pytest.raises(SampleError, match="between 0 and 1"):
        write_line_batch(tmp_path / "x", labelled_share=1.5)
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_line_batch_and_refuses_a_foreign_folder(tmp_path: Path, capsys) -> None:
    assert main(["data", "sample-batch", str(tmp_path / "line"), "--labelled-share", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"wrote 372 images to {tmp_path / 'line'}: 183 labelled in 10 class folders, 189 in unlabelled/" in out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep me")
    assert main(["data", "sample-batch", str(tmp_path / "mine")]) == 2
    assert "not an earlier vitops line batch" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["a.txt"]
    assert main(["data", "sample-batch", str(tmp_path / "y"), "--labelled-share", "-1"]) == 2


def test_clear_errors_for_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} does not exist"):
        _run(tmp_path / "missing", out)
    (tmp_path / "file.png").write_bytes(_png(1))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        _run(tmp_path / "file.png", out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "empty" / "unlabelled").mkdir()
    with pytest.raises(BatchError, match="holds no files"):
        _run(tmp_path / "empty", out)
    write_clean(tmp_path / "batch", {"cat": 1})
    before = tree_digest(tmp_path / "batch")
    with pytest.raises(BatchError, match="inside"):
        _run(tmp_path / "batch", tmp_path / "batch" / "gate")
    with pytest.raises(BatchError, match="model's classes"):
        _run(tmp_path / "batch", out, GateRules())
    with pytest.raises(FileNotFoundError, match="reference manifest"):
        _run(tmp_path / "batch", out, reference=tmp_path / "nope.csv")
    assert tree_digest(tmp_path / "batch") == before
    assert not out.exists()
