"""The manifest: content-hash splits that stay stable as data grows, parallel scanning, and the CSV contract."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.data import write_clean, write_png

from vitops.data_checks.manifest import (
    COLUMNS,
    LayoutError,
    load_usable,
    read_manifest,
    scan_dataset,
    split_by_hash,
    write_manifest,
)

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_splits_are_stable_when_data_grows_and_duplicates_share_a_split(tmp_path: Path) -> None:
    write_clean(tmp_path, {"a": 30, "b": 30})
    before = scan_dataset(tmp_path, FRACTIONS, workers=1).set_index("path")["split"]
    write_clean(tmp_path, {"a": 40, "b": 40, "c": 10}, seed=5000, prefix="new")
    for i in range(5):  # identical bytes under new names
        shutil.copy(tmp_path / "a" / f"img_{i:03d}.png", tmp_path / "a" / f"copy_{i}.png")
    after = scan_dataset(tmp_path, FRACTIONS, workers=2).set_index("path")
    assert (after.loc[before.index, "split"] == before).all(), "existing files keep their split"
    for group in after.groupby("sha256")["split"]:
        assert group[1].nunique() == 1, "identical bytes always land in one split"
    assert set(after["split"]) == {"train", "val", "test"}
    share = (after["split"] == "train").mean()
    assert 0.65 < share < 0.92


def test_split_by_hash_follows_the_fractions() -> None:
    assert split_by_hash("0" * 64, FRACTIONS) == "train"
    assert split_by_hash("f" * 64, FRACTIONS) == "test"
    assert split_by_hash("e" + "0" * 63, FRACTIONS) == "val"  # 0.875 lies in [0.8, 0.9)
    assert split_by_hash("f" * 64, {"train": 0.9, "val": 0.1, "test": 0.0}) == "val"


def test_parallel_scan_matches_serial_scan(tmp_path: Path) -> None:
    write_clean(tmp_path, {"x": 40, "y": 40})
    serial = scan_dataset(tmp_path, FRACTIONS, workers=1)
    parallel = scan_dataset(tmp_path, FRACTIONS, workers=2)
    assert list(serial.columns) == list(COLUMNS)
    assert serial.equals(parallel)


def test_manifest_csv_round_trip_keeps_labels_as_text(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label in ("NA", "0", "null", "007"):
        write_png(data / label / "one, two.png", seed=len(label) + int(label.isdigit()) * 10 + ord(label[0]))
    (data / "0" / "bad.png").write_bytes(b"")
    manifest = scan_dataset(data, FRACTIONS, workers=1)
    write_manifest(manifest, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    assert sorted(back["label"].unique()) == ["0", "007", "NA", "null"]
    usable = load_usable(tmp_path / "m.csv")
    assert "0/bad.png" not in set(usable["path"]) and len(usable) == 4
    assert {"path", "label", "split"} <= set(usable.columns)
    assert usable["width"].dtype.kind in "if"


def test_mixed_layout_is_refused(tmp_path: Path) -> None:
    write_clean(tmp_path / "train", {"a": 1})
    write_clean(tmp_path, {"cats": 1})
    with pytest.raises(LayoutError, match="mixes split folders"):
        scan_dataset(tmp_path, FRACTIONS)


def test_interrupted_manifest_write_keeps_the_previous_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    root = tmp_path / "data"
    write_clean(root, {"a": 6, "b": 6})
    manifest = scan_dataset(root, FRACTIONS, workers=1)
    path = write_manifest(manifest, tmp_path / "artifacts" / "manifest.csv")
    before = path.read_bytes()

    def crash_midway(self: pd.DataFrame, target: str, **kwargs: object) -> None:
        Path(target).write_text("path,label\nhalf-written", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(manifest.head(1), path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["manifest.csv"]


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    from vitops.data_checks import images

    write_clean(tmp_path, {"a": 6})
    with open(tmp_path / "a" / "huge.png", "wb") as fh:  # a sparse 3 GiB file: no disk, and it must not be read
        fh.truncate(3 * 2**30)
    (tmp_path / "a" / "junk.png").write_bytes(b"not an image" * 50_000)
    reads: list[int] = []
    real_open = builtins.open

    def counting_fdopen(fd: int, *args: object, **kwargs: object) -> object:
        reads.append(fd)
        return real_open(fd, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(images.os, "fdopen", counting_fdopen)
    rows = scan_dataset(tmp_path, FRACTIONS, workers=1, max_bytes=2**20).set_index("path")
    assert "over the size limit of 1.0 MiB" in rows.loc["a/huge.png", "error"]
    assert rows.loc["a/huge.png", "bytes"] == 3 * 2**30 and rows.loc["a/huge.png", "sha256"] == ""
    assert len(reads) == 7  # the six images and the junk file were opened; the huge one never
    junk = rows.loc["a/junk.png"]
    assert "not an image Pillow can read" in junk["error"] and junk["bytes"] == 600_000 and len(junk["sha256"]) == 64
    assert (rows.drop(index=["a/huge.png", "a/junk.png"])["error"] == "").all()
