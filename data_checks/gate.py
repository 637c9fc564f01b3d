"""The data gate: run the Great Expectations suites over a manifest, and write the JSON report and Data Docs.

`run_gate` returns the report as a dict:

- `passed`: every critical expectation succeeded (drift expectations are warnings and never fail the gate);
- `rejected`: `{"path", "reason"}` for every file later stages must skip, path relative to the dataset root;
- `failures` and `warnings`: one sentence each, saying what is wrong and what to do;
- `expectations`: one entry per expectation (suite, name, column, success, severity, observed value);
- `counts`: files, usable, rejected, and usable images per label and per split.

Nothing is moved or deleted; the report only lists.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitops.data_checks.suite import (
    GateRules,
    add_check_columns,
    build_classes_suite,
    build_drift_suite,
    build_files_suite,
    class_table,
)

if TYPE_CHECKING:
    import pandas as pd

_DOCS_SITE = "vitops"


def run_gate(
    manifest: pd.DataFrame,
    rules: GateRules,
    reference: pd.DataFrame | None = None,
    docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate a manifest with the gate's Great Expectations suites.

    Args:
        manifest: from `data_checks.manifest.scan_dataset` or `read_manifest`.
        rules: the thresholds.
        reference: an earlier manifest to compare against for drift (warnings only).
        docs_dir: where to build the Data Docs HTML site (replaced on each run); None builds none.

    Returns:
        The report (see the module docstring).
    """
    files = add_check_columns(manifest)
    runner = Runner(docs_dir)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    reasons: dict[str, list[str]] = {}

    if len(files):
        entries, reasons = check_files(
            runner, build_files_suite(rules), files, lambda column, row: file_reason(column, row, rules)
        )
        results += entries
        failures += [_files_failure(entry, rules) for entry in entries if not entry["success"]]
    usable = files[(files["error"] == "") & ~files["path"].isin(reasons.keys())].reset_index(drop=True)
    table = class_table(usable, rules.classes)

    if len(usable):
        usable_suite, classes_suite = build_classes_suite(rules)
        for result in runner.run("usable", usable_suite, usable[["path", "label", "split"]]):
            entry = _entry("usable", result)
            results.append(entry)
            if not entry["success"]:
                missing = sorted(set(rules.classes) - set(usable["label"]))
                failures.append(
                    f"data.classes lists {missing} but no usable image has that label: add the folder(s) "
                    "or remove the class from params.yaml"
                )
        for result in runner.run("classes", classes_suite, table, key="label"):
            entry = _entry("classes", result)
            results.append(entry)
            if not entry["success"]:
                failures.append(_classes_failure(entry["column"], table, rules))
    else:
        failures.append("no usable images: every file was rejected or the folder holds no images")

    warnings = _duplicate_warnings(usable)
    if reference is not None and len(usable):
        entries, drifted = check_drift(
            runner, reference, usable, rules, "the reference",
            "check the new images come from the same source, or make this version the new reference",
        )  # fmt: skip
        results += entries
        warnings += drifted
    unevaluated_warnings, unevaluated_failures = unevaluated(results)
    warnings += unevaluated_warnings
    failures += unevaluated_failures
    rejected = [{"path": p, "reason": "; ".join(dict.fromkeys(r))} for p, r in sorted(reasons.items())]
    passed = not failures and all(r["success"] for r in results if r["severity"] == "critical")
    return {
        "passed": passed,
        "rejected": rejected,
        "failures": failures,
        "warnings": warnings,
        "expectations": results,
        "counts": {
            "files": int(len(files)),
            "usable": int(len(usable)),
            "rejected": len(rejected),
            "labels": {str(k): int(v) for k, v in zip(table["label"], table["images"], strict=True)},
            "splits": {str(k): int(v) for k, v in usable["split"].value_counts().sort_index().items()},
        },
        "data_docs": runner.build_docs(),
    }


def check_files(
    runner: Runner, suite: Any, files: pd.DataFrame, reason_of: Callable[[str, pd.Series], str | None]
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Run the files suite over `files`: its result entries, and the reasons of each file it rejects.

    Args:
        reason_of: (failed column, the file's row) -> what is wrong and what to do; None keeps the file.
    """
    by_path = files.set_index("path", drop=False)
    entries: list[dict[str, Any]] = []
    reasons: dict[str, list[str]] = {}
    for result in runner.run("files", suite, files):
        entry = _entry("files", result)
        entries.append(entry)
        for path in _unexpected_paths(result):
            reason = reason_of(entry["column"], by_path.loc[path])
            if reason:
                reasons.setdefault(path, []).append(reason)
    return entries, reasons


def check_drift(
    runner: Runner,
    reference: pd.DataFrame,
    usable: pd.DataFrame,
    rules: GateRules,
    against: str,
    advice: str,
    labels: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the drift suite of `usable` against the usable files of `reference`: its entries, and a warning
    for each column whose KL divergence is over the threshold (`against` names the reference in it, `advice`
    says what to do)."""
    ref_usable = reference[reference["error"].fillna("") == ""]
    if not len(ref_usable):
        return [], []
    suite = build_drift_suite(ref_usable, usable, rules, labels)
    entries = [_entry("drift", result) for result in runner.run("drift", suite, usable)]
    warnings = [
        f"drift in {e['column']}: KL divergence {format_kl(e['observed'])} against {against} is over "
        f"validate.drift_kl_threshold={rules.drift_kl_threshold}; {advice}"
        for e in entries
        if not e["success"] and not isinstance(e["observed"], dict)
    ]
    return entries, warnings


def unevaluated(results: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Messages for the expectations that raised instead of being evaluated: (warnings, failures), by severity."""
    warnings: list[str] = []
    failures: list[str] = []
    for entry in results:
        if isinstance(entry["observed"], dict) and "exception" in entry["observed"]:
            message = f"{entry['name']} on {entry['column']} could not be evaluated: {entry['observed']['exception']}"
            (warnings if entry["severity"] == "warning" else failures).append(message)
    return warnings, failures


class Runner:
    """One ephemeral GX context for a gate run, with a pandas datasource and optional Data Docs site."""

    def __init__(self, docs_dir: Path | None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # GX sets this module's logger to INFO when it is imported, which prints a line for every ephemeral
        # context ("Created temporary directory ... for ephemeral docs site"); NOTSET: the level of its parents.
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.NOTSET)

        self._gx = gx
        self._context = gx.get_context(mode="ephemeral")
        self._context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._source = self._context.data_sources.add_pandas("manifest")
        self._docs_dir = Path(docs_dir) if docs_dir else None
        if self._docs_dir:
            self._context.add_data_docs_site(
                site_name=_DOCS_SITE,
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(self._docs_dir.resolve()),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )

    def run(self, name: str, suite: Any, frame: pd.DataFrame, key: str = "path") -> list[Any]:
        """Validate `frame` against `suite`; the results, one per expectation, naming failing rows by `key`."""
        gx = self._gx
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = self._context.suites.add(suite)
        definition = self._context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [key]}
        return list(definition.run(batch_parameters={"dataframe": frame}, result_format=result_format).results)

    def build_docs(self) -> str | None:
        """Build the Data Docs site (replacing an earlier one); the path of its index.html."""
        if not self._docs_dir:
            return None
        # Only a folder that GX built before is replaced, so a wrong --report path cannot wipe user files.
        if (self._docs_dir / "index.html").exists() and (self._docs_dir / "static").is_dir():
            shutil.rmtree(self._docs_dir)
        self._context.build_data_docs(site_names=[_DOCS_SITE])
        return str(self._docs_dir / "index.html")


def _entry(suite: str, result: Any) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {
        k: v for k, v in config.kwargs.items() if k not in ("column", "batch_id", "partition_object", "value_set")
    }
    res = result.result or {}
    if res.get("observed_value") is not None:
        observed: Any = res["observed_value"]
    elif "observed_value" in res:  # e.g. missing values of a set: the details say more than None
        observed = {k: v for k, v in res.items() if k != "observed_value"}
    else:
        observed = {"unexpected_count": res.get("unexpected_count", 0), "element_count": res.get("element_count")}
        if res.get("partial_unexpected_list"):
            observed["unexpected_examples"] = res["partial_unexpected_list"][:10]
    error = _exception_message(result)
    if error:
        observed = {"exception": error}
    return {
        "suite": suite,
        "name": config.type,
        "column": config.kwargs.get("column"),
        "success": bool(result.success),
        "severity": str(getattr(config.severity, "value", config.severity) or "critical").lower(),
        "observed": _jsonable(observed),
        "kwargs": _jsonable(kwargs),
    }


def _exception_message(result: Any) -> str | None:
    # exception_info is either one {"raised_exception", ...} dict or a dict of them keyed by metric.
    info = result.exception_info or {}
    candidates = [info] + [v for v in info.values() if isinstance(v, dict)]
    for item in candidates:
        if item.get("raised_exception"):
            return str(item.get("exception_message"))
    return None


def _unexpected_paths(result: Any) -> list[str]:
    return [item["path"] for item in (result.result or {}).get("unexpected_index_list") or []]


def file_reason(column: str, row: pd.Series, rules: GateRules) -> str | None:
    if column == "label" and not row["label"]:  # already rejected as "not inside a label folder"
        return None
    if column == "error":
        return row["error"]
    if column in ("width", "height"):
        return (
            f"image is {int(row['width'])}x{int(row['height'])} px, smaller than the minimum "
            f"{rules.min_width}x{rules.min_height} (validate.min_width/min_height): remove it or lower the minimum"
        )
    if column == "label":
        return (
            f"label '{row['label']}' is not in data.classes {list(rules.classes)}: move the file to one of those "
            "folders or add the class to params.yaml"
        )
    if column == "conflicting_labels":
        return (
            f"the same image (sha256 {row['sha256'][:12]}) is also labelled {row['conflicting_labels']}: "
            "keep it under one label only"
        )
    if column == "leaks_from":
        return (
            f"the same image is also in {row['leaks_from']}: the {row['split']} split leaks from it; "
            "delete one of the copies"
        )
    return f"failed the check on column {column}"


def _files_failure(entry: dict[str, Any], rules: GateRules) -> str:
    count = entry["observed"].get("unexpected_count", 0) if isinstance(entry["observed"], dict) else 0
    what = {
        "error": "are unreadable or not safe to read",
        "width": f"are narrower than validate.min_width={rules.min_width}",
        "height": f"are lower than validate.min_height={rules.min_height}",
        "label": "have a label outside data.classes",
        "conflicting_labels": "are identical to an image under another label",
        "leaks_from": "repeat an image of another split (leakage)",
    }.get(entry["column"], f"fail the check on {entry['column']}")
    limit = (
        f" (more than validate.max_rejected_fraction={rules.max_rejected_fraction})"
        if rules.max_rejected_fraction
        else ""
    )
    return f"{count} file(s) {what}{limit}: see `rejected` in the report for each file and what to do"


def _classes_failure(column: str, table: pd.DataFrame, rules: GateRules) -> str:
    if column == "images":
        small = table[table["images"] < rules.min_images_per_class]
        listed = ", ".join(f"'{lab}' ({n})" for lab, n in zip(small["label"], small["images"], strict=True))
        return (
            f"classes with fewer than validate.min_images_per_class={rules.min_images_per_class} usable images: "
            f"{listed}; add images or lower the minimum"
        )
    present = table[table["images"] > 0]
    big = present.loc[present["images"].idxmax()]
    low = present.loc[present["images"].idxmin()]
    return (
        f"class imbalance {big['images'] / low['images']:.1f}:1 ('{big['label']}' {big['images']} vs "
        f"'{low['label']}' {low['images']}) is over validate.max_imbalance_ratio={rules.max_imbalance_ratio}: "
        "add images to the small classes or raise the ratio"
    )


def format_kl(value: Any) -> str:
    """A KL divergence for a warning: three significant digits (GX reports non-finite values as strings)."""
    return f"{value:.3g}" if isinstance(value, int | float) else str(value)


def _duplicate_warnings(usable: pd.DataFrame) -> list[str]:
    dupes = int(usable.duplicated(subset=["sha256", "label", "split"]).sum()) if len(usable) else 0
    if not dupes:
        return []
    return [f"{dupes} file(s) are exact copies of another file with the same label and split; they add no information"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def validate_folder(
    root: Path,
    rules: GateRules,
    fractions: dict[str, float],
    manifest_path: Path,
    report_path: Path,
    reference_path: Path | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Scan a dataset folder, write its manifest, run the gate and write the report with Data Docs beside it.

    The Data Docs site goes to `<report folder>/data_docs/`.

    Returns:
        The report, with `data_root`, `manifest` and `reference` added.
    """
    from vitops.data_checks.manifest import read_manifest, scan_dataset, write_manifest

    reference = read_manifest(reference_path) if reference_path else None
    # Importing GX takes seconds; do it while the scanner processes decode images.
    manifest = scan_dataset(root, fractions, workers, _import_gx, max_bytes=rules.max_file_bytes)
    write_manifest(manifest, manifest_path)
    report = run_gate(manifest, rules, reference=reference, docs_dir=Path(report_path).parent / "data_docs")
    report["data_root"] = str(root)
    report["manifest"] = str(manifest_path)
    report["reference"] = str(reference_path) if reference_path else None
    write_report(report, report_path)
    return report


def _import_gx() -> None:
    import great_expectations  # noqa: F401


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write the report as JSON (UTF-8, indented), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
