"""Exit codes, the same for every command: 0 ok, 1 a gate said no, 2 a usage or configuration error, 3 a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.data import write_clean

from vitops.flows.cli import data as data_commands
from vitops.flows.cli import main


def test_ok_is_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "sample", str(tmp_path / "digits"), "--size", "20"]) == 0
    assert "wrote 20 images" in capsys.readouterr().out


def test_a_gate_that_says_no_is_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_clean(tmp_path / "data", {"a": 6, "b": 6})
    (tmp_path / "data" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    report = tmp_path / "report.json"
    manifest = tmp_path / "m.csv"
    assert main(["validate", str(tmp_path / "data"), "--report", str(report), "--manifest", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "gate FAILED" in out and "Traceback" not in out


def test_a_named_params_file_that_does_not_exist_is_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["--params", str(missing), "data", "version"]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such parameter file" in err and "Traceback" not in err


def test_usage_errors_are_2_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent does not exist" in err[0]
    with pytest.raises(SystemExit) as exc:  # argparse: unknown flag
        main(["validate", "--no-such-flag"])
    assert exc.value.code == 2


def test_usage_errors_show_their_traceback_with_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "validate", str(tmp_path / "absent")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_crash_is_3_with_its_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: object, params: object) -> int:
        raise ZeroDivisionError("a bug in vitops")

    monkeypatch.setattr(data_commands, "cmd_version", boom)
    assert main(["data", "version"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug in vitops" in err and "crashed" in err


def test_global_options_go_before_or_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    given = ["--params", str(missing)]
    for argv in ([*given, "retrain"], ["retrain", *given], ["data", "version", *given], ["retrain", "-v", *given]):
        assert main(argv) == 2, argv
        assert f"{missing}: no such parameter file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "absent"), "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err
