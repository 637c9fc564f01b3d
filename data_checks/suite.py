"""The Great Expectations suites of the data gate, and the derived columns and tables they check.

Three suites, each over a pandas DataFrame built from the manifest:

- `files` (one row per file): readable, large enough, label allowed, no identical image under another label,
  no image in two splits. Its failing rows are the files later stages skip.
- `classes` (the usable files, and one row per class): no class missing, enough images per class, class
  imbalance within the allowed ratio.
- `drift` (the usable files against a reference manifest): KL divergence of the label distribution and of
  the per-image channel statistics, all with severity "warning", so drift is reported but never fails the gate.

`great_expectations` is imported inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitops.data_checks.images import STAT_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

# Drift histograms: this many quantile bins of the reference, and a floor so no bin has zero weight
# (a zero-weight bin with observed mass would make the KL divergence infinite).
DRIFT_BINS = 10
_SMOOTHING = 0.5


@dataclass(frozen=True)
class GateRules:
    """Thresholds of the gate (from params.yaml's `data.classes` and `validate` section)."""

    classes: tuple[str, ...] = ()
    min_width: int = 16
    min_height: int = 16
    min_images_per_class: int = 5
    max_imbalance_ratio: float = 10.0
    max_rejected_fraction: float = 0.0
    drift_kl_threshold: float = 0.1
    max_file_bytes: int = 64 * 1024 * 1024  # images.MAX_FILE_BYTES: larger files are refused before they are read


def add_check_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """A copy of the manifest with the columns the `files` suite checks beside the scanned ones.

    `conflicting_labels` names the other labels (and one path each) of files with the same bytes;
    `leaks_from` names the copy in an earlier split (train before val before test) of a file that appears in
    two splits. Both are empty when there is nothing to report, and only readable files take part.
    """
    frame = manifest.copy()
    frame["conflicting_labels"] = ""
    frame["leaks_from"] = ""
    readable = frame[(frame["error"] == "") & (frame["sha256"] != "")]
    repeated = readable[readable["sha256"].duplicated(keep=False)]
    order = {"train": 0, "val": 1, "test": 2}
    for _, group in repeated.groupby("sha256", sort=False):
        if group["label"].nunique() > 1:
            for idx, row in group.iterrows():
                others = group[group["label"] != row["label"]]
                named = [f"'{lab}' ({path})" for lab, path in zip(others["label"], others["path"], strict=True)]
                frame.at[idx, "conflicting_labels"] = ", ".join(named[:3]) + (" ..." if len(named) > 3 else "")
        if group["split"].nunique() > 1:
            ranked = group.assign(_rank=group["split"].map(order).fillna(3)).sort_values(["_rank", "path"])
            first = ranked.iloc[0]
            for idx, row in ranked.iloc[1:].iterrows():
                if row["split"] != first["split"]:
                    frame.at[idx, "leaks_from"] = f"{first['split']} ({first['path']})"
    return frame


def class_table(usable: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """One row per class (expected or found): its number of usable images and its ratio to the smallest class."""
    import pandas as pd

    counts = usable["label"].value_counts()
    labels = list(classes) + sorted(set(counts.index) - set(classes))
    images = [int(counts.get(label, 0)) for label in labels]
    smallest = min((n for n in images if n > 0), default=0)
    ratio = [round(n / smallest, 3) if smallest and n else None for n in images]
    return pd.DataFrame({"label": labels, "images": images, "imbalance": ratio})


def build_files_suite(rules: GateRules) -> Any:
    """Per-file expectations; `mostly` lets up to `max_rejected_fraction` of the files fail without failing."""
    import great_expectations as gx

    ex = gx.expectations
    mostly = {"mostly": 1.0 - rules.max_rejected_fraction} if rules.max_rejected_fraction > 0 else {}
    suite = gx.ExpectationSuite(name="files")
    suite.add_expectation(ex.ExpectColumnValuesToBeInSet(column="error", value_set=[""], **mostly))
    suite.add_expectation(ex.ExpectColumnValuesToBeBetween(column="width", min_value=rules.min_width, **mostly))
    suite.add_expectation(ex.ExpectColumnValuesToBeBetween(column="height", min_value=rules.min_height, **mostly))
    if rules.classes:
        suite.add_expectation(ex.ExpectColumnValuesToBeInSet(column="label", value_set=list(rules.classes), **mostly))
    suite.add_expectation(ex.ExpectColumnValuesToBeInSet(column="conflicting_labels", value_set=[""], **mostly))
    suite.add_expectation(ex.ExpectColumnValuesToBeInSet(column="leaks_from", value_set=[""], **mostly))
    return suite


def build_classes_suite(rules: GateRules) -> tuple[Any, Any]:
    """Expectations on the usable files (`usable` suite) and on the class table (`classes` suite)."""
    import great_expectations as gx

    ex = gx.expectations
    usable = gx.ExpectationSuite(name="usable")
    usable.add_expectation(ex.ExpectTableRowCountToBeBetween(min_value=1))
    if rules.classes:
        usable.add_expectation(ex.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(rules.classes)))
    classes = gx.ExpectationSuite(name="classes")
    classes.add_expectation(ex.ExpectColumnValuesToBeBetween(column="images", min_value=rules.min_images_per_class))
    classes.add_expectation(ex.ExpectColumnValuesToBeBetween(column="imbalance", max_value=rules.max_imbalance_ratio))
    return usable, classes


def build_drift_suite(reference: pd.DataFrame, current: pd.DataFrame, rules: GateRules, labels: bool = True) -> Any:
    """KL-divergence expectations (severity warning) from the reference manifest's usable rows.

    Args:
        labels: include the label distribution; a pilot batch leaves it out, since part of it is unlabelled.
    """
    import great_expectations as gx

    ex = gx.expectations
    suite = gx.ExpectationSuite(name="drift")
    kl = {"threshold": rules.drift_kl_threshold, "severity": "warning"}
    if labels:
        suite.add_expectation(
            ex.ExpectColumnKLDivergenceToBeLessThan(
                column="label", partition_object=_label_partition(reference, current), **kl
            )
        )
    for column in STAT_COLUMNS:
        partition = _numeric_partition(reference[column].dropna(), current[column].dropna())
        if partition is not None:
            suite.add_expectation(
                ex.ExpectColumnKLDivergenceToBeLessThan(column=column, partition_object=partition, **kl)
            )
    return suite


def _label_partition(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, list]:
    # Over the union of labels, smoothed, so a label new since the reference gives a finite divergence.
    counts = reference["label"].value_counts()
    values = sorted(set(counts.index) | set(current["label"]))
    weights = [float(counts.get(v, 0)) + _SMOOTHING for v in values]
    total = sum(weights)
    return {"values": values, "weights": [w / total for w in weights]}


def _numeric_partition(reference: pd.Series, current: pd.Series) -> dict[str, list] | None:
    import numpy as np

    if reference.empty or current.empty:
        return None
    low = float(min(reference.min(), current.min())) - 1e-3
    high = float(max(reference.max(), current.max())) + 1e-3
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, DRIFT_BINS + 1)[1:-1]))
    bins = [low, *[float(b) for b in inner if low < b < high], high]
    hist, _ = np.histogram(reference, bins=bins)
    weights = hist.astype(float) + _SMOOTHING
    return {"bins": bins, "weights": (weights / weights.sum()).tolist()}
