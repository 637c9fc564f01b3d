"""From params.yaml sections to the core's typed settings: the one mapping between them, strict both ways.

The core's dataclasses (`vit.train.TrainConfig`, `vit.data.AugmentParams`, `vit.standin.StandinSpec`) take their
values from the params.yaml field of the same name. A core field without a params field, or one whose name
changed on one side only, is an error here (and in tests/test_defaults.py, which also holds the two sides'
defaults equal), never a silently kept default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.flows.config import Params, ParamsError

# Core fields deliberately not in params.yaml: set by the recipe itself, not by users.
_NOT_PARAMS: dict[str, set[str]] = {"TrainConfig": set(), "AugmentParams": set(), "StandinSpec": {"embed_dim"}}


def same_named(cls: type, section: Any, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The values of `section` (a params.yaml section) for every field of dataclass `cls`.

    Raises:
        ParamsError: a field of `cls` has no params field of the same name (a rename on one side only).
    """
    names = type(section).model_fields
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_PARAMS.get(cls.__name__, set())]
    missing = [name for name in fields if name not in names]
    if missing:
        raise ParamsError(
            f"{cls.__name__} fields {missing} have no params.yaml key in {type(section).__name__}: "
            "a field was renamed on one side only; rename it in flows/config.py too"
        )
    return {name: getattr(section, name) for name in fields if name not in exclude}


@dataclass
class Recipe:
    """What one training run builds: model, weights source, output folder and the TrainConfig values."""

    kind: str  # vit | baseline
    model: str
    source: str
    img_size: int
    model_kwargs: dict[str, Any]
    out_dir: Path
    teacher: str | None
    config: dict[str, Any] = field(default_factory=dict)


def recipe_for(params: Params, baseline: bool) -> Recipe:
    """The ViT fine-tuning recipe, or the CNN baseline's (the `train` settings with `baseline` overrides)."""
    from vitops.vit.train import TrainConfig

    t = params.train
    config = same_named(TrainConfig, t)
    if not baseline:
        return Recipe(
            kind="vit",
            model=t.model,
            source=t.source,
            img_size=t.img_size,
            model_kwargs={"patch_size": t.patch_size, "depth": t.depth, "drop_path_rate": t.drop_path},
            out_dir=t.out_dir,
            teacher=t.teacher,
            config=config,
        )
    b = params.baseline
    config.update(epochs=b.epochs, lr=b.lr, layer_decay=None, weight_decay=b.weight_decay)
    return Recipe("baseline", b.model, b.source, t.img_size, {}, b.out_dir, None, config)


def load_rows(params: Params) -> Any:
    """The usable rows of the validated manifest (rejected files are skipped)."""
    from vitops.data_checks.manifest import load_usable

    manifest, report = Path(params.validate_.manifest), Path(params.validate_.report)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest; run `vitops validate` on the data first")
    return load_usable(manifest, report if report.is_file() else None)
