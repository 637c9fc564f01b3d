"""The data gate of a pilot batch: new images from the site, checked before any model scores them.

A batch is a folder of images, labelled or not:

- `BATCH/<class>/...`: labelled `<class>` (the first folder names the label; it must be one of the model's);
- `BATCH/unlabelled/...` and files directly in `BATCH/`: unlabelled (label "").

A file under a folder that names no class is rejected, with a reason that says where to move it. Hidden files
and OS clutter are skipped quietly and symlinks are listed and rejected, never followed, as for training data.
`validate_batch` scans the folder (in parallel processes), writes a manifest with the training manifest's
columns (split "batch"), runs the Great Expectations files suite over it and, against the training data's
manifest, the drift suite on the per-image channel statistics (warnings only). Files are opened read-only;
nothing in the batch is changed, moved or deleted, and nothing is written inside it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitops.data_checks.suite import GateRules

if TYPE_CHECKING:
    import pandas as pd

UNLABELLED = "unlabelled"
SPLIT = "batch"


class BatchError(ValueError):
    """A pilot batch that cannot be checked at all (an empty folder, or results that would land inside it)."""


def label_of(rel: str) -> str:
    """The label a batch file's path gives it: its first folder, or "" in the batch root and `unlabelled/`."""
    first, sep, _ = rel.partition("/")
    return "" if not sep or first == UNLABELLED else first


def scan_batch(root: Path, workers: int = 0, while_scanning: Any = None, max_bytes: int | None = None) -> pd.DataFrame:
    """Scan every file of a batch into a manifest DataFrame (columns `COLUMNS`, split "batch", sorted by path).

    Args:
        root: the batch folder.
        workers: scanner processes; 0 = one per CPU core, 1 = scan in this process.
        while_scanning: called in this process while the scanner processes work.
        max_bytes: files larger than this are refused before they are read (default: `images.MAX_FILE_BYTES`).

    Raises:
        FileNotFoundError, NotADirectoryError, BatchError: when `root` is missing, a file, or holds no files.
    """
    import pandas as pd

    # The walk, the parallel scan and the file-name check of the training manifest: one reader of image
    # folders, so a batch file is judged exactly as a training file would be.
    from vitops.data_checks.images import MAX_FILE_BYTES
    from vitops.data_checks.manifest import COLUMNS, _printable, _scan_rows, _walk

    real_root = _check_root(root)
    rels = sorted(rel for rel, _ in _walk(Path(real_root), ""))
    if not rels:
        raise BatchError(
            f"{root} holds no files (hidden files and OS clutter do not count): copy the batch's images into it, "
            f"in class folders ({root}/<class>/) or in {root}/{UNLABELLED}/"
        )
    # Links go to `scan_file` too: it reports them from lstat and never opens their target.
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    rows = _scan_rows(real_root, rels, workers, while_scanning, limit)
    records = []
    for rel in rels:
        row = rows[rel]
        row["label"], row["split"] = label_of(rel), SPLIT
        row["path"] = _printable(rel, row)
        records.append(row)
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


def _check_root(root: Path) -> str:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist: give the folder that holds the pilot batch's images")
    if not root.is_dir():
        raise NotADirectoryError(
            f"{root} is a file, not a folder: put the batch's images in a folder (class folders, {UNLABELLED}/, "
            "or directly in it) and give that folder"
        )
    return os.path.realpath(root)


def check_batch(
    manifest: pd.DataFrame,
    rules: GateRules,
    reference: pd.DataFrame | None = None,
    docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate a batch manifest: the files suite over every file, the drift suite over the usable ones.

    Args:
        manifest: from `scan_batch`.
        rules: the model's classes and the gate's thresholds; `max_rejected_fraction` is the share of files
            the batch may lose, `drift_kl_threshold` the drift warning level.
        reference: the training data's manifest, for drift warnings on the channel statistics.
        docs_dir: where to build the Data Docs site; None builds none.

    Returns:
        The report (see `validate_batch`), without the paths.
    """
    from vitops.data_checks.gate import Runner, check_drift, check_files, file_reason, unevaluated
    from vitops.data_checks.suite import add_check_columns, build_files_suite

    if not rules.classes:
        raise BatchError("a pilot batch is checked against the model's classes: give them in GateRules.classes")
    # Only copies under two of the model's classes conflict: an image both labelled and unlabelled does not,
    # and a copy in a folder that names no class is rejected for its folder, not its twin for the conflict.
    known = manifest["label"].isin(rules.classes)
    files = add_check_columns(manifest[known])
    files = _concat_sorted(files, manifest[~known].assign(conflicting_labels="", leaks_from=""))
    runner = Runner(docs_dir)
    suite = build_files_suite(dataclasses.replace(rules, classes=(*rules.classes, "")))
    results, reasons = check_files(
        runner, suite, files,
        lambda column, row: _folder_reason(row, rules) if column == "label" else file_reason(column, row, rules),
    )  # fmt: skip
    usable = files[(files["error"] == "") & ~files["path"].isin(reasons.keys())].reset_index(drop=True)

    warnings = _copy_warnings(usable)
    if reference is not None and len(usable):
        entries, drifted = check_drift(
            runner, reference, usable, rules, "the training data",
            "the batch's images differ from the training data (camera, lighting, source); judge the models on its "
            "labelled part, and retrain with such images if they are the new normal",
            labels=False,
        )  # fmt: skip
        results += entries
        warnings += drifted
    unevaluated_warnings, failures = unevaluated(results)
    warnings += unevaluated_warnings

    rejected = [{"path": p, "reason": "; ".join(dict.fromkeys(r))} for p, r in sorted(reasons.items())]
    if not len(usable):
        failures.append("no usable images: every file of the batch was rejected (see `rejected`)")
    share = len(rejected) / len(files) if len(files) else 0.0
    if share > rules.max_rejected_fraction:
        failures.append(
            f"{len(rejected)} of {len(files)} files ({share:.0%}) were rejected, more than "
            f"validate.max_rejected_fraction={rules.max_rejected_fraction}: fix or remove them (see `rejected` for "
            "each file and what to do), or raise the limit"
        )
    counts_by_label = usable.loc[usable["label"] != "", "label"].value_counts()
    labels = list(rules.classes) + sorted(set(counts_by_label.index) - set(rules.classes))
    return {
        "passed": not failures,
        "rejected": rejected,
        "usable": [
            {"path": p, "label": lab, "sha256": sha}
            for p, lab, sha in zip(usable["path"], usable["label"], usable["sha256"], strict=True)
        ],
        "failures": failures,
        "warnings": warnings,
        "expectations": results,
        "counts": {
            "files": int(len(files)),
            "usable": int(len(usable)),
            "rejected": len(rejected),
            "labelled": int((usable["label"] != "").sum()),
            "unlabelled": int((usable["label"] == "").sum()),
            "labels": {label: int(counts_by_label.get(label, 0)) for label in labels},
        },
        "data_docs": runner.build_docs(),
    }


def _concat_sorted(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    frame = pd.concat([a, b]) if len(a) and len(b) else (a if len(a) else b)
    return frame.sort_values("path").reset_index(drop=True)


def _folder_reason(row: pd.Series, rules: GateRules) -> str:
    return (
        f"folder '{row['label']}' is not one of the model's classes {list(rules.classes)}: move the file into "
        f"the folder of its class, or into {UNLABELLED}/ if its class is not known"
    )


def _copy_warnings(usable: pd.DataFrame) -> list[str]:
    copies = int(usable["sha256"].duplicated().sum()) if len(usable) else 0
    if not copies:
        return []
    return [
        f"{copies} usable file(s) are exact copies of another file in the batch: the same image counts more "
        "than once in agreement and accuracy; remove the copies"
    ]


def validate_batch(
    root: Path,
    rules: GateRules,
    report_path: Path,
    manifest_path: Path,
    reference_path: Path | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Scan a pilot batch, write its manifest, run the gate and write the report with Data Docs beside it.

    Args:
        root: the batch folder (never changed).
        rules: the model's classes and the thresholds.
        report_path: the JSON report; the Data Docs site goes to `<report folder>/data_docs/`.
        manifest_path: the batch manifest CSV to write.
        reference_path: the training data's manifest, for drift warnings.
        workers: scanner processes; 0 = one per CPU core.

    Returns:
        The report: `passed` (at least one usable image, and at most `rules.max_rejected_fraction` of the
        files rejected), `rejected` [{path, reason}], `usable` [{path, label, sha256}] sorted by path (label ""
        when unlabelled), `failures`, `warnings`, `expectations`, `counts` {files, usable, rejected, labelled,
        unlabelled, labels}, `data_docs`, `data_root`, `manifest`, `reference`. Paths in `rejected` and
        `usable` are relative to `root`.

    Raises:
        FileNotFoundError, NotADirectoryError: `root` (or `reference_path`) is missing, or `root` is a file.
        BatchError: the batch holds no files, `rules.classes` is empty, or an output lies inside the batch.
    """
    from vitops.data_checks.gate import _import_gx, write_report
    from vitops.data_checks.manifest import read_manifest, write_manifest

    real_root = Path(_check_root(root))
    report_path, manifest_path = Path(report_path), Path(manifest_path)
    docs_dir = report_path.parent / "data_docs"
    for what, path in (("report", report_path), ("manifest", manifest_path), ("Data Docs folder", docs_dir)):
        real = Path(os.path.realpath(path))
        inside = real == real_root or real_root in real.parents
        # The Data Docs folder is replaced on each run: it may not hold the batch either.
        if inside or (path is docs_dir and real in real_root.parents):
            raise BatchError(
                f"the {what} {path} would be written inside (or over) the batch {root}, which vitops never "
                "changes: write it to another folder"
            )
    if reference_path is not None and not Path(reference_path).is_file():
        raise FileNotFoundError(
            f"reference manifest {reference_path} does not exist: give the training data's manifest.csv "
            "(written by `vitops validate`), or leave the reference out"
        )
    reference = read_manifest(reference_path) if reference_path else None
    if not rules.classes:
        raise BatchError("a pilot batch is checked against the model's classes: give them in GateRules.classes")
    # Importing GX takes seconds; do it while the scanner processes decode images.
    manifest = scan_batch(root, workers=workers, while_scanning=_import_gx, max_bytes=rules.max_file_bytes)
    write_manifest(manifest, manifest_path)
    report = check_batch(manifest, rules, reference=reference, docs_dir=docs_dir)
    report["data_root"] = str(root)
    report["manifest"] = str(manifest_path)
    report["reference"] = str(reference_path) if reference_path else None
    write_report(report, report_path)
    return report
