"""From params.yaml to each stage's typed settings: the one place where `Params` is unpacked.

The CLI and the flows read params.yaml once per run, build what a stage takes here (a `Recipe` for a training
run, the `Dataset` it reads, the `RunContext` it logs into) and pass it on; stage functions never see `Params`.

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
from vitops.flows.tracking import RunContext

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
    augment: dict[str, Any] = field(default_factory=dict)  # vit.data.AugmentParams values
    crop_pct: float | None = 1.0
    decode_cache: Path | None = None  # vit.decode's cache folder; None keeps decoded images in memory


def recipe_for(
    params: Params,
    baseline: bool = False,
    source: str | None = None,
    epochs: int | None = None,
    out_dir: Path | None = None,
) -> Recipe:
    """The ViT fine-tuning recipe, or the CNN baseline's (the `train` settings with `baseline` overrides), with a
    command's overrides of the weights source, the epochs and the output folder."""
    from vitops.vit.data import AugmentParams
    from vitops.vit.train import TrainConfig

    t = params.train
    config = same_named(TrainConfig, t)
    augment = same_named(AugmentParams, t)
    if not baseline:
        recipe = Recipe(
            kind="vit",
            model=t.model,
            source=t.source,
            img_size=t.img_size,
            model_kwargs={"patch_size": t.patch_size, "depth": t.depth, "drop_path_rate": t.drop_path},
            out_dir=t.out_dir,
            teacher=t.teacher,
            config=config,
            augment=augment,
            crop_pct=t.crop_pct,
            decode_cache=t.decode_cache,
        )
    else:
        b = params.baseline
        config.update(epochs=b.epochs, lr=b.lr, layer_decay=None, weight_decay=b.weight_decay)
        recipe = Recipe(
            "baseline", b.model, b.source, t.img_size, {}, b.out_dir, None, config, augment, t.crop_pct, t.decode_cache
        )
    if source:
        recipe.source = source
    if epochs:
        recipe.config["epochs"] = epochs
    if out_dir:
        recipe.out_dir = Path(out_dir)
    return recipe


@dataclass(frozen=True)
class Dataset:
    """The validated image folder a run reads: its root, the manifest and report the data gate wrote, and the
    class names params.yaml fixes (empty: the manifest's)."""

    root: Path
    manifest: Path
    report: Path
    classes: tuple[str, ...] = ()

    def rows(self) -> Any:
        """The usable rows of the manifest (rejected files are skipped)."""
        from vitops.data_checks.manifest import load_usable

        if not self.manifest.is_file():
            raise FileNotFoundError(f"{self.manifest}: no manifest; run `vitops validate` on the data first")
        return load_usable(self.manifest, self.report if self.report.is_file() else None)


def dataset_of(params: Params, root: Path | str | None = None) -> Dataset:
    """The dataset params.yaml names (`data.raw_dir`, or `root`), with the data gate's manifest and report."""
    v = params.validate_
    return Dataset(Path(root or params.data.raw_dir), Path(v.manifest), Path(v.report), tuple(params.data.classes))


def run_context(params: Params, parent_run_id: str | None = None) -> RunContext:
    """Where a stage logs: the tracking server and experiment of params.yaml, under `parent_run_id` if given."""
    return RunContext(params.tracking.uri, params.tracking.experiment, parent_run_id, params.tracking.connect_timeout_s)


def prices_of(params: Params) -> Any:
    """`cost` of params.yaml as `deploy.kpi.Prices`; a missing section is a configuration error."""
    from vitops.deploy.kpi import Prices

    if params.cost is None:
        raise ParamsError(
            "params.yaml has no `cost` section: the gate needs prices (train_price_per_hour, serve_price_per_hour, "
            "utilisation, retrains_per_month, images_per_month, upkeep_per_month); copy the `cost` section of the "
            "shipped params.yaml"
        )
    return Prices(**params.cost.model_dump())


def model_folder(arg: Path | str | None, params: Params) -> Path:
    """The model folder a command names (or the folder holding it as `model/`), or the one training wrote."""
    path = Path(arg) if arg else params.train.out_dir / "model"
    if not (path / "model.json").is_file() and (path / "model" / "model.json").is_file():
        path = path / "model"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no model folder here; train one with `vitops train` or name one")
    return path
