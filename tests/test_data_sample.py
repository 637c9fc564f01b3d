"""`vitops data sample`: the bundled digits as a deterministic ImageFolder that never overwrites user files."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.data import tree_digest
from PIL import Image

from vitops.data_checks.sample import SampleError, write_sample


def test_sample_is_deterministic_balanced_and_rewritable(tmp_path: Path) -> None:
    written = write_sample(tmp_path / "a", size=50)
    write_sample(tmp_path / "b", size=50)
    assert len(written) == 50
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    labels = sorted(p.parent.name for p in written)
    assert labels == sorted([str(d) for d in range(10)] * 5)
    with Image.open(written[0]) as img:
        assert img.size == (32, 32) and img.mode == "L"
    # An earlier sample may be rewritten (smaller); files the user added are kept.
    (tmp_path / "a" / "3" / "mine.png").write_bytes(b"user file")
    write_sample(tmp_path / "a", size=20)
    assert len(list((tmp_path / "a").rglob("digit_*.png"))) == 20
    assert (tmp_path / "a" / "3" / "mine.png").read_bytes() == b"user file"


def test_sample_refuses_a_folder_with_user_files(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(SampleError, match="not an earlier vitops sample"):
        write_sample(tmp_path / "photos", size=10)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]
