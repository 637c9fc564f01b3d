"""`vitops validate` and `vitops data sample` from the command line: files written and exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.data import write_clean

from vitops.data_checks.manifest import load_usable
from vitops.flows.cli import main


def test_validate_sample_passes_and_writes_manifest_report_and_docs(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "digits", tmp_path / "out"
    assert main(["data", "sample", str(data), "--size", "60"]) == 0
    args = ["validate", str(data), "--report", str(out / "report.json"), "--manifest", str(out / "m.csv")]
    assert main(args) == 0
    assert "gate passed: 60 files, 60 usable, 0 rejected" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["rejected"] == [] and report["counts"]["usable"] == 60
    assert (out / "data_docs" / "index.html").is_file()
    assert len(load_usable(out / "m.csv", out / "report.json")) == 60
    # The same data as its own reference: no drift warnings, still passing.
    assert main([*args, "--reference", str(out / "m.csv")]) == 0
    assert not json.loads((out / "report.json").read_text(encoding="utf-8"))["warnings"]


def test_validate_fails_with_exit_1_on_bad_data(tmp_path: Path, capsys) -> None:
    write_clean(tmp_path / "data", {"a": 6, "b": 6})
    (tmp_path / "data" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    report = tmp_path / "r.json"
    assert (
        main(["validate", str(tmp_path / "data"), "--report", str(report), "--manifest", str(tmp_path / "m.csv")]) == 1
    )
    out = capsys.readouterr().out
    assert "rejected: a/broken.jpg:" in out and "gate FAILED" in out
    assert json.loads(report.read_text(encoding="utf-8"))["rejected"][0]["path"] == "a/broken.jpg"


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_clean(tmp_path / "mixed" / "val", {"a": 1})
    write_clean(tmp_path / "mixed", {"dogs": 1})
    assert main(["validate", str(tmp_path / "mixed"), "--report", str(tmp_path / "r.json")]) == 2
    assert "mixes split folders" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep me")
    assert main(["data", "sample", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "a.txt").read_text() == "keep me"
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--no-such-flag"])
    assert exc.value.code == 2
