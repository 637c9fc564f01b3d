"""A manifest of every file of a registered version's folder, with its sha256, and its check before a load.

`vitops register` writes `vitops_manifest.json` into the pyfunc folder it uploads: each file's path, size and
sha256, plus the records the version was registered with (its gate verdict, KPIs, data and code versions), and
the version gets the manifest's own sha256 as its tag `manifest.sha256`. Whoever loads the version (the pyfunc
model, the endpoint, `vitops verify`) checks first, with `check_folder`, that the folder holds exactly these
files with these digests; a file that differs, is missing or was added refuses the version, named.

Only the standard library is imported: this file is also shipped as code with every pyfunc model (beside
`pyfunc_model.py`), whose loader imports nothing of vitops.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILE = "vitops_manifest.json"
SIGNATURE_FILE = "vitops_manifest.sig"  # a model-signing signature of the folder, where the version is signed
FORMAT = "vitops-manifest/1"
# Written by MLflow into a downloaded copy of a registered model, and by Python when it imports the shipped code.
_NOT_OURS = {"registered_model_meta", MANIFEST_FILE, SIGNATURE_FILE}


class ManifestError(RuntimeError):
    """A folder that does not match its manifest; the message names the file."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(folder: Path, records: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest of every file under `folder` (links refused), with `records` kept beside the files."""
    files = {}
    for rel in _files(Path(folder)):
        path = Path(folder) / rel
        if path.is_symlink():
            raise ManifestError(f"{rel} is a symbolic link: a registered version holds plain files only")
        files[rel] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    return {"format": FORMAT, "algorithm": "sha256", "files": files, "records": dict(records or {})}


def write_manifest(folder: Path, records: dict[str, str] | None = None) -> str:
    """Write `vitops_manifest.json` into `folder`; the manifest file's own sha256 (the version's tag)."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(build_manifest(folder, records), indent=1, sort_keys=True), encoding="utf-8")
    return sha256_of(path)


def read_manifest(folder: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The folder's manifest, checked against `expected_sha256` (the version's tag) when given.

    Raises:
        ManifestError: no readable manifest, or one whose sha256 is not the expected one.
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        actual = sha256_of(path)
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ManifestError(f"{MANIFEST_FILE}: missing or unreadable in {folder} ({err})") from None
    if expected_sha256 and actual != expected_sha256:
        raise ManifestError(
            f"{MANIFEST_FILE}: sha256 {actual[:12]}... differs from the version's record manifest.sha256 "
            f"{expected_sha256[:12]}...: the manifest was replaced"
        )
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{MANIFEST_FILE} in {folder}: not a {FORMAT} manifest")
    return manifest


def check_folder(folder: Path, manifest: dict[str, Any]) -> int:
    """Check that `folder` holds exactly the manifest's files with their sha256; how many files were checked.

    Raises:
        ManifestError: the first file that differs, is missing, or is not in the manifest, named.
    """
    folder = Path(folder)
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ManifestError(f"{rel}: a manifest path must stay inside the version's folder")
        if path.is_symlink() or not path.is_file():
            raise ManifestError(f"{rel}: missing from the version's files (the manifest lists it)")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size):
            raise ManifestError(f"{rel}: {path.stat().st_size} bytes, the manifest records {entry['bytes']}")
        actual = sha256_of(path)
        if actual != entry.get("sha256"):
            raise ManifestError(
                f"{rel}: sha256 {actual[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}...: "
                "the file was changed after registration"
            )
    extra = sorted(set(_files(folder)) - set(listed))
    if extra:
        raise ManifestError(f"{extra[0]}: not in the version's manifest (a file added after registration)")
    return len(listed)


def _files(folder: Path) -> list[str]:
    """Relative paths of the files under `folder` that a manifest covers."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in filenames:
            rel = Path(dirpath, filename).relative_to(folder).as_posix()
            if rel not in _NOT_OURS:
                found.append(rel)
    return sorted(found)
