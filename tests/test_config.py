"""Parameter loading: the shipped params.yaml is valid, and bad values name key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitops.flows.cli import main
from vitops.flows.config import Params, ParamsError, load_params, parse_params


def test_shipped_params_file_loads_and_matches_code_defaults(repo_root: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    # every section of params.yaml is a section of Params and every key in it was read, not ignored
    for section, values in raw.items():
        model = getattr(params, "validate_" if section == "validate" else section)
        assert set(values) <= set(type(model).model_fields), section


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_params(tmp_path / "absent.yaml") == Params()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lr": -1}}, ["train.lr", "-1", "greater than 0"]),
        ({"train": {"amp": "fp8"}}, ["train.amp", "'fp8'", "Input should be 'auto'"]),
        ({"data": {"split": {"train": 0.5}}}, ["data.split", "sum to 1.0"]),
        ({"train": {"epochz": 3}}, ["train.epochz", "unknown key", "epochs"]),
        ({"trian": {}}, ["trian", "unknown key", "train"]),
        ({"engine": {"trt_min_batch": 8, "trt_opt_batch": 4}}, ["engine", "trt_min_batch <= trt_opt_batch"]),
        ({"engine": {"aot_precision": "int8"}}, ["engine.aot_precision", "'int8'", "'fp16'"]),
        ({"engine": {"aot_max_batch": 1}}, ["engine.aot_max_batch", "greater than or equal to 2"]),
        ({"engine": {"target": "trt"}}, ["engine.target", "'torch-aot'"]),
        ({"data": {"classes": ["cat", "cat"]}}, ["data.classes", "repeated", "cat"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw: dict, expected: list[str]) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(raw, "params.yaml")
    message = str(err.value)
    assert message.startswith("params.yaml")
    for fragment in expected:
        assert fragment in message


def test_cli_reports_bad_params_file_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("validate:\n  min_width: zero\n")
    code = main(["--params", str(bad), "validate", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}: invalid parameters" in err
    assert "validate.min_width: 'zero'" in err
    assert "Traceback" not in err


def test_not_yaml_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="p.yaml: not valid YAML"):
        load_params(bad)
