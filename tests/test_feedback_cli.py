"""`vitops feedback import` and `vitops feedback accuracy`: a CSV of operators' verdicts joins the prediction log
(written here with `PredictionLog` as the endpoint writes it); a bad CSV is refused whole, naming the line and
value, with nothing written; labels are checked against data.classes or the champion's classes in the registry."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml
from helpers.registry import unique
from mlflow import MlflowClient

from vitops.deploy.prediction_log import Prediction, PredictionLog, day_files, latest_labels, read_feedback
from vitops.flows.cli import main

CLASSES = ["bolt", "nut", "washer"]


def _sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _answer(i: int, label: str, version: str = "1", route: str = "champion") -> Prediction:
    return Prediction(time.time() - 60, f"req{i}{route}", _sha(i), "line-vit", version, "onnxruntime-fp32", label,
                      0.9, 3.0, route, "st-1")  # fmt: skip


def _params(tmp_path: Path, classes: list[str], **tracking: str) -> Path:
    raw = {"data": {"classes": classes}, "prediction_log": {"dir": str(tmp_path / "log")}}
    if tracking:
        raw["tracking"] = tracking
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_feedback_import_joins_the_log_and_gives_realized_accuracy(tmp_path: Path, capsys) -> None:
    params = _params(tmp_path, CLASSES)
    with PredictionLog(tmp_path / "log") as plog:
        for i, label in enumerate(["bolt", "nut", "washer", "bolt"]):
            plog.append(_answer(i, label))
        plog.append(_answer(0, "nut", version="2", route="shadow"))
    rows = (
        f"sha256,label,operator\n{_sha(0)},bolt,ana\n{_sha(1).upper()},washer,\n{_sha(2)},washer,ben\n{_sha(9)},nut,\n"
    )
    verdicts = _csv(tmp_path / "line-3 verdicts.csv", rows)

    assert main(["--params", str(params), "feedback", "import", str(verdicts), "--operator", "kim"]) == 0
    out = capsys.readouterr().out
    assert "labels checked against data.classes in params.yaml" in out
    assert "4 row(s)" in out and "4 appended" in out and "3 of them match logged predictions" in out
    labels = latest_labels(tmp_path / "log")
    assert {sha: (fb.label, fb.operator, fb.source) for sha, fb in labels.items()} == {
        _sha(0): ("bolt", "ana", "csv:line-3 verdicts.csv"),
        _sha(1): ("washer", "kim", "csv:line-3 verdicts.csv"),  # upper-case hex is the same hash; --operator fills in
        _sha(2): ("washer", "ben", "csv:line-3 verdicts.csv"),
        _sha(9): ("nut", "kim", "csv:line-3 verdicts.csv"),  # no prediction of it yet: kept for when it comes
    }

    # The same file again: nothing appended twice.
    assert main(["--params", str(params), "feedback", "import", str(verdicts), "--operator", "kim"]) == 0
    assert "4 row(s) were in the log already" in capsys.readouterr().out
    assert len(read_feedback(tmp_path / "log")) == 4

    assert main(["--params", str(params), "feedback", "accuracy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    champion = next(line for line in lines if " 1 champion" in line)
    shadow = next(line for line in lines if " 2 shadow" in line)
    assert "66.67 % (2/3, 95% CI" in champion and "4        3" in champion  # 4 answered, 3 labelled, nut != washer
    assert "0.00 % (0/1, 95% CI" in shadow  # the shadow said nut, the operator bolt
    assert (
        main(["--params", str(params), "feedback", "accuracy", "--since", "2000-01-01", "--until", "2000-01-02"]) == 0
    )
    assert "no answers logged" in capsys.readouterr().out


def test_a_bad_csv_exits_2_naming_each_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    params = _params(tmp_path, CLASSES)
    bad = _csv(tmp_path / "bad.csv", (
        "sha256,label,operator,time\n"
        f"{_sha(1)},bolt,ana,2026-12-04T10:00\n"
        f"{_sha(2)[:-1]},bolt,ana,\n"  # line 3: 63 hex digits
        f"{_sha(3)},screw,ana,\n"  # line 4: not a class
        f"{_sha(1)},nut,ana,\n"  # line 5: the same image again
        f"{_sha(4)},,ana,\n"  # line 6: no label
        f"{_sha(5)},nut,ana,yesterday\n"  # line 7: not a time
        f"{_sha(6)},nut,,\n"  # line 8: no operator, none given
    ))  # fmt: skip
    assert main(["--params", str(params), "feedback", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: 6 bad row(s), nothing was imported" in err
    assert f"line 3: sha256 '{_sha(2)[:-1]}' is not 64 hex digits" in err
    assert "line 4: label 'screw' is not one of the model's classes ['bolt', 'nut', 'washer']" in err
    assert f"line 5: sha256 {_sha(1)} is already on line 2" in err
    assert "line 6: empty label" in err
    assert "line 7: time 'yesterday' is not a date" in err
    assert "line 8: no operator" in err
    assert not (tmp_path / "log").exists() or not day_files(tmp_path / "log"), "nothing may be written"

    unknown = _csv(tmp_path / "unknown.csv", f"sha256,label,verdict\n{_sha(1)},bolt,ok\n")
    assert main(["--params", str(params), "feedback", "import", str(unknown), "--operator", "kim"]) == 2
    assert "unknown.csv, line 1: unknown column(s) ['verdict']" in capsys.readouterr().err
    assert main(["--params", str(params), "feedback", "import", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert not day_files(tmp_path / "log")


@pytest.mark.integration
def test_labels_are_checked_against_the_champions_classes(tmp_path: Path, tracking: str, capsys) -> None:
    """With data.classes empty, the champion's model.json (through the registry) gives the classes; a model with
    no champion leaves the labels unchecked, and says so."""
    name = unique("feedback-classes")
    client = MlflowClient()
    experiment = client.create_experiment(unique("feedback"))
    run = client.create_run(experiment)
    meta = tmp_path / "pyfunc" / "artifacts" / "model" / "model.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"classes": CLASSES, "img_size": 32}), encoding="utf-8")
    client.log_artifacts(run.info.run_id, str(tmp_path / "pyfunc"), "pyfunc")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/pyfunc", run.info.run_id).version
    client.set_registered_model_alias(name, "champion", version)

    params = _params(tmp_path, [], registered_model=name, experiment=name)
    screw = _csv(tmp_path / "screw.csv", f"sha256,label\n{_sha(1)},screw\n")
    assert main(["--params", str(params), "feedback", "import", str(screw), "--operator", "kim"]) == 2
    captured = capsys.readouterr()
    assert f"labels checked against the classes of {name} version {version} (champion)" in captured.out
    assert "line 2: label 'screw' is not one of the model's classes ['bolt', 'nut', 'washer']" in captured.err

    other = unique("no-champion")
    assert main(["--params", str(params), "feedback", "import", str(screw), "--operator", "kim", "--model", other]) == 0
    out = capsys.readouterr().out
    assert f"labels not checked: data.classes is empty and the champion of {other} cannot be read" in out
    assert latest_labels(tmp_path / "log")[_sha(1)].label == "screw"
