"""The data stage: the DVC data version of the image folder, and the Great Expectations gate over it.

    current_data_version(raw, data)   the folder's DVC data version, pulled from the remote when not here
    validate(data_dir, checks, data)  scan into a manifest, run the gate            -> ValidateResult

Nothing here moves or changes a file of the user's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitops.flows.config import DataParams, ValidateParams
from vitops.flows.settings import Dataset


@dataclass
class ValidateResult:
    passed: bool
    data: Path
    report_path: Path
    manifest_path: Path
    data_docs: str
    counts: dict[str, int]
    rejected: list[dict[str, str]]
    failures: list[str]
    warnings: list[str]
    classes: tuple[str, ...] = ()

    @property
    def dataset(self) -> Dataset:
        """The validated folder as the next stages read it."""
        return Dataset(self.data, self.manifest_path, self.report_path, self.classes)


def current_data_version(raw: Path, data: DataParams) -> str:
    """The DVC data version of `raw`, pulled from the remote when the folder is missing or empty; `untracked`
    when DVC does not track it."""
    from vitops.flows.versioning import data_version, pull_data

    if not raw.is_dir() or not any(raw.iterdir()):
        return pull_data(raw, data.remote, data.remote_name) or "untracked"
    return data_version(raw) or "untracked"


def validate(
    data_dir: Path,
    checks: ValidateParams,
    data: DataParams,
    report: Path | None = None,
    manifest: Path | None = None,
    reference: Path | None = None,
    workers: int | None = None,
) -> ValidateResult:
    """Scan the dataset into a manifest and run the Great Expectations gate (nothing is moved or changed).

    Args:
        data_dir: the image folder (class subfolders, or train/val/test splits of them).
        checks: the gate's thresholds and where it writes (`validate` of params.yaml).
        data: the class names and split fractions (`data` of params.yaml).
        report, manifest, reference, workers: overrides of `checks`.
    """
    from vitops.data_checks.gate import validate_folder
    from vitops.data_checks.suite import GateRules

    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"{data_dir} does not exist: give the dataset folder, or import data first")
    rules = GateRules(
        classes=tuple(data.classes),
        min_width=checks.min_width,
        min_height=checks.min_height,
        min_images_per_class=checks.min_images_per_class,
        max_imbalance_ratio=checks.max_imbalance_ratio,
        max_rejected_fraction=checks.max_rejected_fraction,
        drift_kl_threshold=checks.drift_kl_threshold,
        max_file_bytes=int(checks.max_file_mb * 2**20),
    )
    report_path = Path(report or checks.report)
    manifest_path = Path(manifest or checks.manifest)
    out = validate_folder(
        data_dir,
        rules,
        fractions=data.split.model_dump(),
        manifest_path=manifest_path,
        report_path=report_path,
        reference_path=reference or checks.reference_manifest,
        workers=checks.workers if workers is None else workers,
    )
    return ValidateResult(
        passed=bool(out["passed"]),
        data=data_dir,
        report_path=report_path,
        manifest_path=manifest_path,
        data_docs=str(out["data_docs"]),
        counts=dict(out["counts"]),
        rejected=list(out["rejected"]),
        failures=list(out["failures"]),
        warnings=list(out["warnings"]),
        classes=tuple(data.classes),
    )
