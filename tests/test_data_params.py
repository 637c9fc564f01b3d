"""The shipped params.yaml loads, and its data and validate sections hold values the gate can use."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitops.flows.config import ParamsError, load_params, parse_params


def test_shipped_params_yaml_loads(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.data.raw_dir == Path("data/raw")
    assert abs(sum(params.data.split.model_dump().values()) - 1.0) < 1e-9
    v = params.validate_
    assert v.min_width >= 1 and v.min_height >= 1 and v.max_imbalance_ratio >= 1.0
    assert 0.0 <= v.max_rejected_fraction < 1.0


def test_bad_validate_value_names_key_and_value() -> None:
    with pytest.raises(ParamsError, match=r"validate\.max_rejected_fraction: 1\.5 is not allowed"):
        parse_params({"validate": {"max_rejected_fraction": 1.5}})
