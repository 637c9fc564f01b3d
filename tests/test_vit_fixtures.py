"""A check of the tiny digits that the vit/train tests share (tests/helpers/vit.py)."""

from __future__ import annotations

from pathlib import Path

from helpers.vit import write_digits


def test_write_digits_gives_every_split_every_class(tmp_path: Path) -> None:
    rows = write_digits(tmp_path / "digits", size=50)
    assert len(rows) == 50
    for split in ("train", "val", "test"):
        assert set(rows[rows.split == split].label) == {str(d) for d in range(10)}
