"""Atomic file writes, file hashing and UTC timestamps: the neutral leaf that data_checks, vit, deploy and flows
all import (it imports nothing of theirs, nor anything heavy).

Manifests, reports, checkpoints, model folders, metrics and engines are all published through `atomic_write`:
a reader (or a crash) sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: Path | str, write: Callable[[str], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then rename: readers see the old or the new file.

    Args:
        path: final file; its folder is created when missing.
        write: writes the content to the temp file whose path it is given.

    Any exception, KeyboardInterrupt included, removes the temp file and leaves an existing `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp creates 0600 (and some writers recreate the file): published files get the usual mode
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes | Iterable[bytes] | Callable[[BinaryIO], None]) -> Path:
    """`atomic_write` of bytes, an iterable of byte chunks, or a function that writes into the open temp file."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            elif isinstance(data, bytes | bytearray | memoryview):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)

    return atomic_write(path, _write)


def atomic_write_json(path: Path | str, data: Any) -> Path:
    """Write `data` as indented, key-sorted JSON (with a final newline), atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_copy(src: Path | str, dst: Path | str) -> Path:
    """Copy a file atomically (used to publish a finished engine written elsewhere)."""

    def _copy(fh: BinaryIO) -> None:
        with open(src, "rb") as inp:
            while block := inp.read(1 << 20):
                fh.write(block)

    return atomic_write_bytes(dst, _copy)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    """The current time as an ISO 8601 UTC timestamp to the second, e.g. `2026-12-01T22:44:44Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
