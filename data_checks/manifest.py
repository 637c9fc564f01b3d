"""Dataset scanning into a manifest: one row per file, with label, split, content hash, size and drift statistics.

A dataset is an ImageFolder, either flat (`ROOT/<label>/...`) or pre-split (`ROOT/{train,val,test}/<label>/...`).
Flat folders are split by content hash (`split_by_hash`), so splits stay stable when data grows and identical
bytes always land in the same split; pre-split folders keep their own splits. Hidden files and OS clutter are
skipped quietly, symlinks are listed (with a reason) but never followed. Scanning runs in parallel processes.

The manifest CSV is the contract with later stages: they read it with `load_usable`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitops.data_checks.images import MAX_FILE_BYTES, STAT_COLUMNS, empty_row, scan_files

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "label", "split", "sha256", "bytes", "format", "mode", "width", "height", *STAT_COLUMNS, "error")
_TEXT_COLUMNS = ("path", "label", "split", "sha256", "format", "mode", "error")
# Files and folders that operating systems and archivers leave behind; never data.
CLUTTER = frozenset({".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN", "Icon\r"})
# In-process scanning is faster than starting processes for tiny folders.
_MIN_FILES_FOR_PROCESSES = 64


class LayoutError(ValueError):
    """A dataset folder whose layout is neither flat nor pre-split (or mixes both)."""


@dataclass(frozen=True)
class Entry:
    """One non-hidden entry found in a dataset folder (a file, or a link or special file to report)."""

    rel: str
    label: str
    split: str
    is_link: bool = False


def is_ignored(name: str) -> bool:
    """Hidden files (including AppleDouble `._*`) and OS clutter, which scanning and import skip quietly."""
    return name.startswith(".") or name in CLUTTER


def detect_layout(root: Path) -> str:
    """Say whether `root` is `flat` (label folders), `split` (train/val/test folders) or `empty`.

    Raises:
        LayoutError: when split folders and label folders sit side by side.
    """
    names = sorted(e.name for e in os.scandir(root) if not is_ignored(e.name) and e.is_dir(follow_symlinks=False))
    split_names = [n for n in names if n in SPLITS]
    other = [n for n in names if n not in SPLITS]
    if split_names and other:
        raise LayoutError(
            f"{root} mixes split folders ({', '.join(split_names)}) with label folders ({', '.join(other[:5])}): "
            f"use either {root}/<label>/... or {root}/{{train,val,test}}/<label>/..., not both"
        )
    if split_names:
        return "split"
    return "flat" if names else "empty"


def list_entries(root: Path) -> tuple[str, list[Entry]]:
    """Walk a dataset folder without following links.

    Returns:
        The layout and one entry per file (sorted by path). Symlinks, to files or folders, are entries with
        `is_link` set and are not descended into. A file outside any label folder gets an empty label.
    """
    layout = detect_layout(root)
    depth = 2 if layout == "split" else 1
    entries = [Entry(rel, *_label_split(rel, depth), is_link=link) for rel, link in _walk(root, "")]
    return layout, sorted(entries, key=lambda e: e.rel)


def _label_split(rel: str, depth: int) -> tuple[str, str]:
    parts = rel.split("/")
    if len(parts) <= depth:  # a file directly in the root (or directly in train/)
        return "", parts[0] if depth == 2 and len(parts) == 2 else ""
    return parts[depth - 1], parts[0] if depth == 2 else ""


def _walk(root: Path, prefix: str) -> Iterator[tuple[str, bool]]:
    with os.scandir(root / prefix if prefix else root) as it:
        for entry in it:
            if is_ignored(entry.name):
                continue
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            if entry.is_symlink():
                yield rel, True
            elif entry.is_dir(follow_symlinks=False):
                yield from _walk(root, rel)
            else:
                yield rel, False


def split_by_hash(sha256: str, fractions: Mapping[str, float]) -> str:
    """Map a content hash to train/val/test: the hash's first 52 bits as a fraction in [0, 1).

    The same bytes always get the same split, and adding files never moves existing ones.
    """
    value = int(sha256[:13], 16) / float(1 << 52)
    edge = 0.0
    for name in SPLITS:
        edge += fractions.get(name, 0.0)
        if value < edge:
            return name
    return next(name for name in reversed(SPLITS) if fractions.get(name, 0.0) > 0)


def scan_dataset(
    root: Path,
    fractions: Mapping[str, float],
    workers: int = 0,
    while_scanning: Callable[[], object] | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> pd.DataFrame:
    """Scan every file of a dataset into a manifest DataFrame (columns `COLUMNS`, sorted by path).

    Args:
        root: the dataset folder.
        fractions: train/val/test fractions for a flat folder.
        workers: scanner processes; 0 = one per CPU core, 1 = scan in this process.
        while_scanning: called in this process while the scanner processes work (the gate imports Great
            Expectations there, which takes seconds).

    Raises:
        NotADirectoryError: if `root` is not a folder.
        LayoutError: if the folder mixes split and label folders.
    """
    import pandas as pd

    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder: give the folder that holds the label folders")
    real_root = os.path.realpath(root)
    layout, entries = list_entries(Path(real_root))
    rows = _scan_rows(real_root, [e.rel for e in entries if not e.is_link], workers, while_scanning, max_bytes)
    for entry in entries:
        if entry.is_link:
            rows[entry.rel] = _link_row(entry.rel)
    records = []
    for entry in entries:
        row = rows[entry.rel]
        row["label"], row["split"] = entry.label, entry.split
        if not entry.label and not row["error"]:
            where = f"{root}/{entry.split}/<label>/" if layout == "split" else f"{root}/<label>/"
            row["error"] = f"not inside a label folder: move it to {where}"
        if layout != "split" and row["sha256"]:
            row["split"] = split_by_hash(row["sha256"], fractions)
        row["path"] = _printable(entry.rel, row)
        records.append(row)
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    log.info("scanned %d files in %s (%s layout)", len(frame), root, layout)
    return frame


def _scan_rows(
    root: str,
    rels: list[str],
    workers: int,
    while_scanning: Callable[[], object] | None,
    max_bytes: int = MAX_FILE_BYTES,
) -> dict[str, dict[str, Any]]:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(rels) < _MIN_FILES_FOR_PROCESSES:
        rows = {row["path"]: row for row in scan_files(root, rels, max_bytes)}
        if while_scanning:
            while_scanning()
        return rows
    # Several chunks per process keep all of them busy to the end; chunks amortise the pickling.
    size = max(1, min(256, len(rels) // (workers * 8)))
    chunks = [rels[i : i + size] for i in range(0, len(rels), size)]
    rows: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        # All work is submitted (and, with fork, every process started) before `while_scanning` runs, so
        # nothing it starts is forked into the workers.
        futures = [pool.submit(scan_files, root, chunk, max_bytes) for chunk in chunks]
        if while_scanning:
            while_scanning()
        for future in futures:
            rows.update((row["path"], row) for row in future.result())
    return rows


def _link_row(rel: str) -> dict[str, Any]:
    row = empty_row(rel)
    row["error"] = (
        "symbolic link: not followed (vitops never reads outside the dataset folder); replace the link with a "
        "copy of the image"
    )
    return row


def _printable(rel: str, row: dict[str, Any]) -> str:
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        row["error"] = "file name is not valid UTF-8: rename the file"
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_manifest(manifest: pd.DataFrame, path: Path) -> Path:
    """Write a manifest CSV (UTF-8) atomically, creating its folder: an interrupted scan keeps the old one."""
    from vitops.common.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: manifest.to_csv(tmp, index=False, encoding="utf-8"))
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest CSV; labels such as `NA` or `0` stay text, blank numbers become NaN."""
    import pandas as pd

    numeric = [c for c in COLUMNS if c not in _TEXT_COLUMNS]
    frame = pd.read_csv(
        path,
        dtype=dict.fromkeys(_TEXT_COLUMNS, str),
        keep_default_na=False,
        na_values=dict.fromkeys(numeric, [""]),
        encoding="utf-8",
    )
    missing = [c for c in ("path", "label", "split", "error") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a vitops manifest (missing columns {missing}): run `vitops validate`")
    return frame


def rejected_paths(report_path: Path) -> set[str]:
    """The paths the validation report lists under `rejected`."""
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    return {item["path"] for item in report.get("rejected", [])}


def load_usable(manifest_path: Path, report_path: Path | None = None) -> pd.DataFrame:
    """The manifest rows later stages may use: readable, and not rejected by the validation report.

    Args:
        manifest_path: the manifest CSV written by `vitops validate`.
        report_path: its JSON report; when given, every path in its `rejected` list is dropped too.

    Returns:
        A DataFrame with at least the columns path (relative to the dataset root), label and split.
    """
    frame = read_manifest(manifest_path)
    keep = frame["error"] == ""
    if report_path is not None:
        keep &= ~frame["path"].isin(rejected_paths(report_path))
    return frame[keep].reset_index(drop=True)
