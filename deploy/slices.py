"""Per-class and per-slice accuracy of a model's test predictions, each with a Wilson interval, and the worst of
each flagged: where an inspection engineer looks for data bias before a rollout.

Pure functions over tables (pandas): the evaluation hands over its per-image predictions (path, label, pred,
correct) and the attributes of each image (`image_attributes`: the file's size, the folder above its class folder,
and any column of an optional metadata CSV); `slice_metrics` groups them. Slices smaller than `min_images` are
listed but never flagged as the worst: one wrong image of two says little.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from vitops.deploy.guardrails import accuracy


@dataclass
class Group:
    """One class or slice: its accuracy with the Wilson interval (fractions 0..1)."""

    attribute: str  # `class`, `size`, `folder` or a metadata column
    value: str
    correct: int
    n: int
    top1: float
    low: float
    high: float

    def as_dict(self) -> dict[str, Any]:
        """All fields, for JSON."""
        return asdict(self)

    def describe(self) -> str:
        """E.g. `size 32x32: 97.50 % (78/80, 95% CI 91.3..99.3)`."""
        return f"{self.attribute} {self.value}: {self.top1 * 100:.2f} % ({self.correct}/{self.n}, CI " \
            f"{self.low * 100:.1f}..{self.high * 100:.1f})"  # fmt: skip


def image_attributes(paths: list[str], manifest: Any, metadata: Any = None, by: tuple[str, ...] = ()) -> Any:
    """A table (path plus one column per attribute in `by`) of the images at `paths`.

    Args:
        paths: image paths relative to the data root (posix).
        manifest: the data gate's manifest (path, width, height, ...).
        metadata: an optional table with a `path` column and attribute columns.
        by: `size`, `folder` and/or metadata columns.

    Raises:
        ValueError: an attribute that is neither `size`, `folder` nor a metadata column.
    """
    import pandas as pd

    frame = pd.DataFrame({"path": list(paths)})
    for name in by:
        if name == "size":
            sizes = manifest.set_index("path")[["width", "height"]]
            known = frame["path"].map(lambda p: p in sizes.index)
            frame["size"] = [
                f"{int(sizes.at[p, 'width'])}x{int(sizes.at[p, 'height'])}" if ok else "unknown"
                for p, ok in zip(frame["path"], known, strict=True)
            ]
        elif name == "folder":  # the folder above the class folder: the source a file came from
            frame["folder"] = [str(PurePosixPath(p).parent.parent) or "." for p in frame["path"]]
        elif metadata is not None and name in metadata.columns:
            values = metadata.drop_duplicates("path").set_index("path")[name].astype(str)
            frame[name] = frame["path"].map(values).fillna("unknown")
        else:
            raise ValueError(f"slice attribute {name!r} is neither size, folder nor a column of the metadata CSV")
    return frame


def slice_metrics(predictions: Any, attributes: Any, confidence: float = 0.95, min_images: int = 5) -> dict[str, Any]:
    """Accuracy per class and per slice value, with Wilson intervals, and the worst of each.

    Args:
        predictions: one row per image: path, label, correct (0/1).
        attributes: `image_attributes` of the same images.
        confidence: level of the intervals.
        min_images: the least images a group needs to be flagged as the worst.

    Returns:
        `classes` and `slices` (lists of `Group` dicts, worst first), `worst_class` and `worst_slice` (a
        `Group` dict, or None when no group is large enough).
    """
    merged = predictions[["path", "label", "correct"]].merge(attributes, on="path", how="left")
    classes = _groups(merged, "label", "class", confidence)
    slices = [
        g for column in attributes.columns if column != "path" for g in _groups(merged, column, column, confidence)
    ]
    slices.sort(key=lambda g: (g.top1, -g.n))

    def worst(groups: list[Group]) -> dict[str, Any] | None:
        big = [g for g in groups if g.n >= min_images]
        return min(big, key=lambda g: (g.top1, -g.n)).as_dict() if big else None

    return {
        "classes": [g.as_dict() for g in classes],
        "slices": [g.as_dict() for g in slices],
        "worst_class": worst(classes),
        "worst_slice": worst([g for g in slices if _varies(slices, g.attribute)]),
        "confidence": confidence,
        "min_images": min_images,
    }


def _groups(frame: Any, column: str, attribute: str, confidence: float) -> list[Group]:
    out = []
    for value, part in frame.groupby(column, sort=True):
        correct, n = int(part["correct"].sum()), int(len(part))
        acc = accuracy(correct, n, confidence)
        out.append(Group(attribute, str(value), correct, n, float(acc.top1), float(acc.low), float(acc.high)))
    return sorted(out, key=lambda g: (g.top1, -g.n))


def _varies(groups: list[Group], attribute: str) -> bool:
    """Whether an attribute splits the images at all (one value for every image is no slice)."""
    return sum(g.attribute == attribute for g in groups) > 1


def markdown_slices(metrics: dict[str, Any], shown: int = 5) -> str:
    """The per-class table, the worst slices and the flags, as Markdown."""
    pct = f"{metrics['confidence'] * 100:g}% CI"
    lines = [f"| class | top-1 | {pct} | images |", "|---|---|---|---|"]
    lines += [_row(g["value"], g) for g in metrics["classes"]]
    if metrics["slices"]:
        lines += ["", f"| slice | top-1 | {pct} | images |", "|---|---|---|---|"]
        lines += [_row(f"{g['attribute']} {g['value']}", g) for g in metrics["slices"][:shown]]
    flags = []
    for what in ("class", "slice"):
        g = metrics[f"worst_{what}"]
        if g is not None:
            flags.append(f"- **worst {what}**: {Group(**g).describe()}")
        else:
            flags.append(f"- worst {what}: none with {metrics['min_images']} images or more that splits the data")
    return "\n".join([*lines, "", *flags])


def _row(name: str, g: dict[str, Any]) -> str:
    low, high = g["low"] * 100, g["high"] * 100
    return f"| {name} | {g['top1'] * 100:.2f} % | {low:.1f}..{high:.1f} | {g['correct']}/{g['n']} |"
