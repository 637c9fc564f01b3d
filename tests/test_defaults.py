"""One source of defaults: the core's dataclasses and the params.yaml models agree field by field."""

from __future__ import annotations

import dataclasses

import pytest

from vitops.flows.config import Params, PretrainParams, TrainParams
from vitops.flows.settings import same_named
from vitops.vit.data import AugmentParams
from vitops.vit.standin import StandinSpec
from vitops.vit.train import TrainConfig

PAIRS = [(TrainConfig, TrainParams), (AugmentParams, TrainParams), (StandinSpec, PretrainParams)]


@pytest.mark.parametrize(("core", "section"), PAIRS, ids=lambda c: c.__name__)
def test_core_defaults_equal_params_defaults(core: type, section: type) -> None:
    params = section() if section is not PretrainParams else Params().pretrain
    values = same_named(core, params)  # raises when a core field has no params field of its name
    defaults = {f.name: f.default for f in dataclasses.fields(core) if f.name in values}
    assert defaults == values


def test_a_field_renamed_on_one_side_fails_loudly() -> None:
    @dataclasses.dataclass
    class Renamed:
        epochs: int = 30
        learning_rate: float = 5e-4  # TrainParams calls it lr

    with pytest.raises(ValueError, match=r"\['learning_rate'\] have no params.yaml key in TrainParams"):
        same_named(Renamed, TrainParams())
