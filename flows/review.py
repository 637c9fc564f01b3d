"""A candidate's review beside its evaluation: the corruption suite on the test split and the per-class and
slice accuracy, written next to `metrics.json`.

    robustness(model, meta, dataset, severities, out)   top-1 clean and under each corruption -> robustness.json
    slices(predictions, dataset, settings, out)          per-class and slice accuracy with intervals -> slices.json

The evaluation stage calls both for every model it evaluates (the candidate and the CNN baseline); the KPI gate
calls `robustness` for a champion it re-evaluates, and reads the files for the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json
from vitops.flows.config import Params
from vitops.flows.settings import Dataset

ROBUSTNESS_FILE = "robustness.json"
SLICES_FILE = "slices.json"
MISCLASSIFIED_FILE = "misclassified.png"
EXPLAINED_FILE = "disagreements_explained.png"


@dataclass(frozen=True)
class ReviewSettings:
    """The corruption suite (`robustness` of params.yaml; None: off) and the slices (`slices`)."""

    severities: Any = None  # vit.robustness.Severities
    slice_by: tuple[str, ...] = ("size", "folder")
    metadata: Path | None = None
    min_images: int = 5
    confidence: float = 0.95
    explain_images: int = 16

    @classmethod
    def from_params(cls, params: Params) -> ReviewSettings:
        from vitops.vit.robustness import Severities

        r, s = params.robustness, params.slices
        severities = Severities(**r.model_dump(exclude={"enabled"})) if r.enabled else None
        return cls(severities, tuple(s.by), s.metadata, s.min_images, s.confidence, s.explain_images)


def robustness(
    model: Any, meta: Any, dataset: Dataset, severities: Any, out: Path | None = None, images: Any = None
) -> dict[str, Any]:
    """Top-1 of `model` on the test split, clean and under each corruption of the suite; written to
    `out/robustness.json` when `out` is given. The severities are recorded with the numbers.

    Args:
        images: the test split as `vit.data.ImageRows`, when the caller has it decoded already.
    """
    from dataclasses import asdict

    from vitops.vit.augment import Normalise
    from vitops.vit.data import create_dataset
    from vitops.vit.robustness import robustness_top1

    images = images if images is not None else create_dataset(dataset.root, dataset.rows(), meta, "test")
    top1 = robustness_top1(model, images.decoded.images, images.targets, Normalise(meta.mean, meta.std), severities)
    result = {"top1": top1, "severities": asdict(severities), "images": len(images)}
    if out is not None:
        atomic_write_json(Path(out) / ROBUSTNESS_FILE, result)
    return result


def read_robustness(folder: Path) -> dict[str, float] | None:
    """The per-corruption top-1 an evaluation wrote (`clean` included), or None when it ran without the suite."""
    path = Path(folder) / ROBUSTNESS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["top1"] if path.is_file() else None


def slices(predictions: Path, dataset: Dataset, settings: ReviewSettings, out: Path) -> dict[str, Any]:
    """Per-class and per-slice accuracy of the predictions `vitops evaluate` wrote, into `out/slices.json`.

    Raises:
        ValueError: a slice attribute that is neither size, folder nor a column of the metadata CSV.
    """
    import pandas as pd

    from vitops.deploy.slices import image_attributes, slice_metrics

    preds = pd.read_csv(predictions)
    metadata = None
    if settings.metadata is not None:
        if not Path(settings.metadata).is_file():
            raise ValueError(f"slices.metadata: {settings.metadata} does not exist; name a CSV or set it to null")
        metadata = pd.read_csv(settings.metadata, dtype=str)
        if "path" not in metadata.columns:
            raise ValueError(f"slices.metadata: {settings.metadata} has no `path` column (relative to the data root)")
    attributes = image_attributes(list(preds["path"]), dataset.rows(), metadata, settings.slice_by)
    result = slice_metrics(preds, attributes, settings.confidence, settings.min_images)
    atomic_write_json(Path(out) / SLICES_FILE, result)
    return result


def read_slices(folder: Path) -> dict[str, Any] | None:
    """The slices an evaluation wrote, or None."""
    path = Path(folder) / SLICES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def review(
    model: Any, meta: Any, dataset: Dataset, predictions: Path, out: Path, settings: ReviewSettings
) -> tuple[dict[str, float], list[Path]]:
    """The corruption suite (when on) and the slices of one evaluated model: their MLflow metrics and files."""
    from vitops.vit.data import create_dataset

    out = Path(out)
    images = create_dataset(dataset.root, dataset.rows(), meta, "test")
    top1 = robustness(model, meta, dataset, settings.severities, out, images)["top1"] if settings.severities else None
    sliced = slices(predictions, dataset, settings, out)
    files = [out / SLICES_FILE] + ([out / ROBUSTNESS_FILE] if top1 else [])
    grid = explain_misclassified(model, meta, images, predictions, out / MISCLASSIFIED_FILE, settings.explain_images)
    return review_metrics(top1, sliced), files + ([grid] if grid else [])


def explain_misclassified(model: Any, meta: Any, images: Any, predictions: Path, out: Path, limit: int) -> Path | None:
    """The first `limit` misclassified test images with heatmaps of the predicted class, as a picture grid;
    None when none was wrong, `limit` is 0, or the model is no ViT (then any older grid is removed)."""
    import pandas as pd

    from vitops.vit.explain import attention_blocks, explain_images, write_grid

    out.unlink(missing_ok=True)
    preds = pd.read_csv(predictions, dtype={"label": str, "pred": str})
    wrong = preds[preds["correct"] == 0].head(limit)
    if wrong.empty or not attention_blocks(model):
        return None
    index = {p: i for i, p in enumerate(images.paths)}
    rgb = [images.decoded.image(index[p]) for p in wrong["path"]]
    maps, _ = explain_images(model, meta, rgb)
    items = [
        {"image": image, "heatmap": heat, "label": row.label, "pred": row.pred, "confidence": row.confidence}
        for image, heat, row in zip(rgb, maps, wrong.itertuples(), strict=True)
    ]
    return write_grid(out, items)


def review_metrics(top1: dict[str, float] | None, sliced: dict[str, Any] | None) -> dict[str, float]:
    """Flat MLflow metrics: `robust_top1/<corruption>`, `worst_class_top1`, `worst_slice_top1`."""
    out = {f"robust_top1/{k}": float(v) for k, v in (top1 or {}).items() if k != "clean"}
    for what in ("class", "slice"):
        group = (sliced or {}).get(f"worst_{what}")
        if group:
            out[f"worst_{what}_top1"] = float(group["top1"])
    return out


def review_checks(candidate: Any, reference: Any, rules: Any, sliced: dict[str, Any] | None, suite: bool) -> list[Any]:
    """The gate's robustness checks (when the suite ran) and its optional worst-class floor (`gate` of params)."""
    from vitops.deploy.review import check_robustness, check_worst_class

    checks = []
    if suite:
        checks += check_robustness(
            candidate, reference, rules.max_robustness_drop_points, rules.max_mean_robustness_drop_points
        )
    return checks + check_worst_class(sliced, rules.min_class_top1, candidate.label)


def review_sections(
    candidate: Any, reference: Any, evaluation: Path, report_dir: Path, severities: Any
) -> tuple[dict[str, str], list[Path]]:
    """The KPI report's review sections (title -> Markdown) and the pictures they show, copied beside the report:
    robustness (candidate and reference per corruption), classes and slices, misclassified test images."""
    import shutil
    from dataclasses import asdict

    from vitops.deploy.review import robustness_markdown
    from vitops.deploy.slices import markdown_slices

    sections: dict[str, str] = {}
    if severities is not None:
        sections["Robustness"] = robustness_markdown(candidate, reference, asdict(severities))
    sliced = read_slices(evaluation)
    if sliced is not None:
        sections["Classes and slices"] = markdown_slices(sliced)
    shown = []
    grid = Path(evaluation) / MISCLASSIFIED_FILE
    if grid.is_file():
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        shown.append(Path(shutil.copyfile(grid, Path(report_dir) / MISCLASSIFIED_FILE)))
        sections["Misclassified test images"] = (
            f"Each with its label, the prediction and its confidence, and where the model looked (attention "
            f"rollout, see docs/explain.md).\n\n![misclassified test images]({MISCLASSIFIED_FILE})"
        )
    elif sliced is not None:
        sections["Misclassified test images"] = "None: every test image was classified right."
    return sections, shown


def explain_files(model_dir: Path, paths: list[Path], out: Path, target: str | None = None) -> list[dict[str, Any]]:
    """Heatmaps of any image files for a ViT model folder, as a picture grid at `out`; one answer per image.

    Args:
        target: the class every heatmap explains; None: each image's predicted class.

    Raises:
        ValueError: an unknown target class; `vit.explain.ExplainError` for a model that is no ViT.
    """
    from vitops.vit.bundle import load_bundle
    from vitops.vit.data import image_dataset
    from vitops.vit.explain import explain_images, write_grid

    model, meta = load_bundle(Path(model_dir))
    if target is not None and target not in meta.classes:
        raise ValueError(f"--target {target!r} is not a class of this model: {', '.join(meta.classes)}")
    images = image_dataset(Path("."), [str(p) for p in paths], [0] * len(paths), meta, training=False)
    rgb = [images.decoded.image(i) for i in range(len(images))]
    targets = None if target is None else [meta.classes.index(target)] * len(rgb)
    maps, probs = explain_images(model, meta, rgb, targets)
    answers = [
        {"path": str(p), "pred": meta.classes[int(row.argmax())], "confidence": float(row.max())}
        for p, row in zip(paths, probs, strict=True)
    ]
    items = [
        a | {"image": image, "heatmap": heat, "label": None, "name": Path(a["path"]).name}
        for a, image, heat in zip(answers, rgb, maps, strict=True)
    ]
    write_grid(Path(out), items)
    return answers


def explain_disagreements(
    models: dict[str, tuple[str, Any]], items: list[dict[str, Any]], root: Path, out: Path
) -> Path | None:
    """The pilot's disagreements with a heatmap of each model's answer, champion beside candidate, as one grid;
    None when there are none or a model is no ViT.

    Args:
        models: role -> (version, pyfunc `ImageClassifier`, whose `model_dir` holds the PyTorch model).
        items: the disagreements (`path` relative to `root`, `label`, `<role>_label`, `<role>_confidence`).
    """
    from vitops.vit.bundle import load_bundle
    from vitops.vit.data import image_dataset
    from vitops.vit.explain import attention_blocks, explain_images, write_grid

    Path(out).unlink(missing_ok=True)
    if not items:
        return None
    cells: dict[str, list[dict[str, Any]]] = {}
    for role, (version, classifier) in models.items():
        model, meta = load_bundle(Path(classifier.model_dir))
        if not attention_blocks(model):
            return None
        images = image_dataset(Path(root), [i["path"] for i in items], [0] * len(items), meta, training=False)
        rgb = [images.decoded.image(i) for i in range(len(images))]
        targets = [meta.classes.index(i[f"{role}_label"]) for i in items]
        maps, _ = explain_images(model, meta, rgb, targets)
        cells[role] = [
            {"image": image, "heatmap": heat, "label": i.get("label") or None, "pred": i[f"{role}_label"],
             "confidence": i[f"{role}_confidence"], "name": f"{role} v{version}: {Path(i['path']).name}"}
            for image, heat, i in zip(rgb, maps, items, strict=True)
        ]  # fmt: skip
    grid = [cells[role][k] for k in range(len(items)) for role in cells]
    return write_grid(Path(out), grid, columns=2 * len(cells) if len(cells) > 1 else 4)
