"""Back from the line: operators' verdicts in bulk, and the labelled logged images as the next data version.

    read_feedback_csv(path, classes, operator)     every row of a feedback CSV, checked     -> list[Feedback]
    import_feedback(rows, log_dir)                 append them to the prediction log        -> FeedbackImport
    model_classes(name, data_classes, run)         the classes labels are checked against   -> Classes
    select_labelled(log_dir, since, until, ...)    labelled, kept images; disagreements first -> Selection
    data_from_log(selection, out, data, checks)    an ImageFolder, the data gate, a DVC data version -> FromLog

The prediction log (`deploy/prediction_log.py`) is only read here, except for the feedback rows that
`import_feedback` appends; its kept images are copied, never moved. The data folder changes only after the data
gate passed on exactly what the new version will hold (the current data plus the new images, checked in a staging
tree of links beside it), through `flows/versioning.import_images`, the path `vitops data import` takes.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vitops.common.files import atomic_copy, sha256_file
from vitops.deploy.prediction_log import Feedback, LogError, parse_time
from vitops.flows.config import DataParams, ValidateParams
from vitops.flows.tracking import RunContext
from vitops.flows.validation import ValidateResult, current_data_version, validate
from vitops.flows.versioning import ImportResult, import_images

CSV_COLUMNS = ("sha256", "label", "operator", "time")
_SHA = re.compile(r"[0-9a-f]{64}")
_SHOWN_ERRORS = 20
_FUTURE_SLACK_S = 300.0  # a clock a few minutes ahead is not a typo in the year


class FeedbackCsvError(ValueError):
    """A feedback CSV with bad rows; the message names the file, each bad line and value, and what to do."""


class FromLogError(ValueError):
    """A from-log request that cannot go ahead (an output folder in the way, nothing to take)."""


# -- feedback in bulk -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classes:
    """The class names feedback labels are checked against, and where they came from (empty: not checked)."""

    names: tuple[str, ...]
    source: str


def model_classes(name: str, data_classes: list[str], run: RunContext) -> Classes:
    """params.yaml `data.classes` when set, else the classes of the champion of `name` (its `model.json`, read
    through the registry), else none (the reason says why)."""
    from vitops.flows import registry, tracking

    if data_classes:
        return Classes(tuple(data_classes), "data.classes in params.yaml")
    try:
        run.configure()
        champion = registry.version_info(name, "champion")
        with tempfile.TemporaryDirectory(prefix="vitops-classes-") as tmp:
            meta = tracking.download_artifact(f"{champion.source}/artifacts/model/model.json", Path(tmp))
            names = tuple(str(c) for c in _json(meta)["classes"])
    except (registry.RegistryError, tracking.TrackingError, OSError, KeyError, ValueError) as err:
        return Classes((), f"data.classes is empty and the champion of {name} cannot be read ({err})")
    return Classes(names, f"the classes of {name} version {champion.version} (champion)")


def _json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_feedback_csv(path: Path, classes: tuple[str, ...] = (), operator: str = "") -> list[Feedback]:
    """Read and check every row of a feedback CSV (header `sha256,label[,operator][,time]`) before any is used.

    Args:
        path: the CSV (UTF-8, a spreadsheet's byte-order mark allowed).
        classes: the allowed labels; empty allows any.
        operator: the operator of rows whose `operator` cell is missing or blank.

    Returns:
        One Feedback per row (source `csv:<file name>`), in file order; a row without `time` gets the import time.

    Raises:
        FileNotFoundError: no such file.
        FeedbackCsvError: any bad row (bad sha256, unknown column, empty label, a label outside `classes`, a
            sha256 repeated, a bad time, no operator), each named by file, line and value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a CSV with the columns sha256,label[,operator][,time]")
    now = time.time()
    errors: list[str] = []
    rows: list[Feedback] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        _check_header(path, header)
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                errors.append(f"line {line}: {len(cells)} values, the header has {len(header)} ({','.join(header)})")
                continue
            row = {k: v.strip() for k, v in zip(header, cells, strict=True)}
            problems = _row_problems(row, classes, operator, now)
            sha = row["sha256"].lower()
            if sha in seen:
                problems.append(f"sha256 {sha} is already on line {seen[sha]}: keep one row per image")
            seen.setdefault(sha, line)
            if problems:
                errors.extend(f"line {line}: {p}" for p in problems)
                continue
            stamp = _row_time(row.get("time", ""), now)
            who = row.get("operator") or operator
            rows.append(Feedback(stamp, sha, row["label"], who, f"csv:{path.name}"))
    if errors:
        shown = "\n  ".join(errors[:_SHOWN_ERRORS])
        more = f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        raise FeedbackCsvError(f"{path}: {len(errors)} bad row(s), nothing was imported; fix them:\n  {shown}{more}")
    if not rows:
        raise FeedbackCsvError(f"{path} holds a header but no rows: one row per image, sha256,label[,operator]")
    return rows


def _check_header(path: Path, header: list[str]) -> None:
    if not any(header):
        raise FeedbackCsvError(f"{path} is empty: its first line must be the header sha256,label[,operator][,time]")
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [c for c in ("sha256", "label") if c not in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if unknown or missing or repeated:
        what = "; ".join(
            part
            for part in (
                f"unknown column(s) {unknown}" if unknown else "",
                f"missing column(s) {missing}" if missing else "",
                f"repeated column(s) {repeated}" if repeated else "",
            )
            if part
        )
        raise FeedbackCsvError(
            f"{path}, line 1: {what}; the header must be sha256,label and optionally operator and time "
            f"(got {','.join(header)})"
        )


def _row_problems(row: dict[str, str], classes: tuple[str, ...], operator: str, now: float) -> list[str]:
    problems = []
    if not _SHA.fullmatch(row["sha256"].lower()):
        problems.append(f"sha256 {row['sha256']!r} is not 64 hex digits: give the sha256 the endpoint answered")
    if not row["label"]:
        problems.append("empty label: give the image's true class")
    elif classes and row["label"] not in classes:
        problems.append(f"label {row['label']!r} is not one of the model's classes {list(classes)}")
    if not (row.get("operator") or operator):
        problems.append("no operator: fill the operator column or pass --operator NAME")
    if row.get("time"):
        try:
            if _row_time(row["time"], now) > now + _FUTURE_SLACK_S:
                problems.append(f"time {row['time']!r} is in the future: check the date")
        except LogError as err:
            problems.append(str(err))
    return problems


def _row_time(text: str, now: float) -> float:
    return parse_time(text, now=now) if text else now


@dataclass
class FeedbackImport:
    """What `import_feedback` appended."""

    appended: int
    already: int  # rows the log holds already (the same file imported before): not appended again
    matched: int  # appended rows whose sha256 the log has predictions for


def import_feedback(rows: list[Feedback], log_dir: Path) -> FeedbackImport:
    """Append checked feedback rows to the prediction log, skipping rows the log holds already (same sha256,
    label, operator and source), and count how many match logged predictions."""
    from vitops.deploy.prediction_log import PredictionLog, read_feedback, read_predictions

    known = read_feedback(log_dir)
    held = set(zip(known["sha256"], known["label"], known["operator"], known["source"], strict=True))
    fresh = [r for r in rows if (r.sha256, r.label, r.operator, r.source) not in held]
    with PredictionLog(log_dir) as plog:
        for row in fresh:
            plog.append_feedback(row)
    logged = set(read_predictions(log_dir)["sha256"])
    return FeedbackImport(len(fresh), len(rows) - len(fresh), sum(r.sha256 in logged for r in fresh))


# -- labelled logged images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """One logged image with an operator's label and a kept copy."""

    sha256: str
    label: str  # the latest feedback's
    image: Path  # the kept copy in the log's image store
    disagreement: bool  # a shadow answer differed from the champion's
    confidence: float  # the lowest confidence it was answered with (NaN: none)


@dataclass
class Selection:
    """The labelled logged images to take, disagreements first, then the least confident."""

    images: list[Labelled]
    not_kept: int  # labelled images of the window whose image the log did not keep
    left_out: int  # beyond --limit
    bad_labels: dict[str, int] = field(default_factory=dict)  # label -> images: not a usable class folder


def select_labelled(
    log_dir: Path, since: float, until: float | None = None, limit: int | None = None, classes: tuple[str, ...] = ()
) -> Selection:
    """The images logged in [since, until) that have feedback (the latest per sha256) and a kept copy.

    Args:
        classes: the training data's classes; a label outside them (when given) cannot join the data.
    """
    from vitops.deploy.prediction_log import image_path, latest_labels, read_predictions

    frame = read_predictions(log_dir, since, until)
    labels = latest_labels(log_dir)
    frame = frame[frame["sha256"].isin(labels.keys())]
    ok = frame[frame["status"] == "ok"]
    shadow = ok[(ok["route"] == "shadow") & ok["champion_label"].notna()]
    disagree = set(shadow.loc[shadow["label"] != shadow["champion_label"], "sha256"])
    lowest = ok.groupby("sha256")["confidence"].min()
    chosen: list[Labelled] = []
    not_kept = 0
    bad: dict[str, int] = {}
    for sha in dict.fromkeys(frame["sha256"]):
        label = labels[sha].label
        if not _usable_folder(label) or (classes and label not in classes):
            bad[label] = bad.get(label, 0) + 1
            continue
        kept = image_path(log_dir, sha)
        if kept is None:
            not_kept += 1
            continue
        chosen.append(Labelled(sha, label, kept, sha in disagree, float(lowest.get(sha, float("nan")))))
    # Disagreements first, then the least confident (NaN last); the hash breaks ties, so the order is stable.
    chosen.sort(key=lambda i: (not i.disagreement, i.confidence != i.confidence, i.confidence, i.sha256))
    kept_n = len(chosen) if limit is None else min(limit, len(chosen))
    return Selection(chosen[:kept_n], not_kept, len(chosen) - kept_n, bad)


def _usable_folder(label: str) -> bool:
    # A label becomes a folder name: nothing hidden (scans skip it), no path separators.
    return bool(label) and not label.startswith(".") and "/" not in label and "\\" not in label


def write_image_folder(images: list[Labelled], out: Path) -> list[Path]:
    """Copy the images to `<out>/<label>/<sha256>.<ext>`; `out` must be new or empty (nothing is overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FromLogError(f"{out} exists and is not an empty folder: give a new folder with --out")
    written = []
    for item in images:
        dst = out / item.label / f"{item.sha256}{item.image.suffix.lower()}"
        written.append(atomic_copy(item.image, dst))
    return written


# -- a new data version -----------------------------------------------------------------------------------------


@dataclass
class FromLog:
    """What `data_from_log` did: the folder it wrote, what joined the data, the gate and the new version."""

    out: Path
    written: list[Path]
    selection: Selection
    version_before: str | None = None
    already_in_data: int = 0
    gate: ValidateResult | None = None
    imported: ImportResult | None = None

    @property
    def passed(self) -> bool:
        """False only when the data gate said no."""
        return self.gate is None or self.gate.passed


def data_from_log(
    selection: Selection,
    out: Path,
    data: DataParams,
    checks: ValidateParams,
    do_import: bool = True,
    push: bool = True,
) -> FromLog:
    """Write the selection as an ImageFolder, then (unless not `do_import`) add the images that are not in the
    current data version by content to it as a new data version, if the data gate passes on the result.

    The gate runs on a staging tree of links (the current data plus the new images at their final paths), with
    its report and manifest in `<validate.report folder>/from-log/`; only when it passes are the new images
    imported (copy, `dvc add`, push, git commit). A failed gate leaves the data folder and its version as they were.
    """
    raw = Path(data.raw_dir)
    if do_import and Path(out).resolve().is_relative_to(raw.resolve()):
        raise FromLogError(f"--out {out} is inside the data folder {raw}: write the ImageFolder somewhere else")
    written = write_image_folder(selection.images, out)
    result = FromLog(Path(out), written, selection)
    if not do_import or not written:
        return result
    result.version_before = current_data_version(raw, data)
    layout_prefix = "train/" if _is_split(raw) else ""
    present = _hashes(raw)
    new = [p for p, item in zip(written, selection.images, strict=True) if item.sha256 not in present]
    result.already_in_data = len(written) - len(new)
    if not new:
        return result
    rels = [layout_prefix + p.relative_to(out).as_posix() for p in new]
    gate_dir = Path(checks.report).parent / "from-log"
    with tempfile.TemporaryDirectory(prefix=f".{raw.name}.from-log-", dir=raw.parent) as tmp:
        staging = Path(tmp) / raw.name
        _link_tree(raw, staging)
        for src, rel in zip(new, rels, strict=True):
            _link(src, staging / rel)
        result.gate = validate(staging, checks, data, report=gate_dir / "report.json",
                               manifest=gate_dir / "manifest.csv")  # fmt: skip
        if not result.gate.passed:
            return result
        source = Path(tmp) / "from-log"  # its name goes into the commit message
        for src, rel in zip(new, rels, strict=True):
            _link(src, source / rel)
        result.imported = import_images(source, raw, data.remote, data.remote_name, push=push)
    return result


def _is_split(raw: Path) -> bool:
    from vitops.data_checks.manifest import detect_layout

    return raw.is_dir() and detect_layout(raw) == "split"


def _hashes(raw: Path) -> set[str]:
    from vitops.data_checks.manifest import is_ignored

    found = set()
    for dirpath, dirnames, filenames in os.walk(raw):
        dirnames[:] = [d for d in dirnames if not is_ignored(d)]
        for name in filenames:
            path = Path(dirpath) / name
            if not is_ignored(name) and path.is_file() and not path.is_symlink():
                found.add(sha256_file(path))
    return found


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    _link_or_copy(str(src), str(dst))


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link costs nothing and is only ever read; another file system gets a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
