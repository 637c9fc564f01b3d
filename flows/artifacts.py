"""Whether a version's files and records are the ones that were gated: checked on demand (`vitops verify`) and by
the promote step before it asks for an approval.

- `verify_version`: the version downloaded afresh and checked as every loader checks it (`registry.check_artifacts`:
  its manifest, every file's sha256, the records it was registered with);
- `edited_records`: the same check of the records alone, from the manifest file (the gate verdict a promotion
  relies on cannot be changed by editing a tag in the UI);
- `run_tags`: the tags of the MLflow run a pilot record names, for `promotion.unbacked_records`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from vitops.flows.registry import (
    MANIFEST_TAG,
    ArtifactCheckError,
    VersionInfo,
    edited_reason,
    edited_tags,
    fetch_version,
    lookup,
    mlflow_client,
    server_errors,
    version_info,
)


def verify_version(name: str, ref: str) -> tuple[VersionInfo, int]:
    """Download a version (a number or an alias) afresh and check it as a loader does.

    Returns:
        The version, and how many of its files were checked.

    Raises:
        ArtifactCheckError: a file or record differs from the version's manifest (named), or it has none.
    """
    from vitops.common.file_manifest import read_manifest

    info = version_info(name, ref)
    with tempfile.TemporaryDirectory(prefix="vitops-verify-") as tmp:
        path = fetch_version(name, info.version, Path(tmp))
        if not info.tags.get(MANIFEST_TAG):
            raise ArtifactCheckError(
                f"{name} version {info.version} has no manifest (registered before vitops wrote one): only the "
                "files serving.json records were checked, and they match; register it again to verify it whole"
            )
        return info, len(read_manifest(path)["files"])


def edited_records(name: str, version: str) -> str | None:
    """Why the version's records (gate verdict, KPIs, data and code versions, who registered it) are not the ones
    its manifest holds, or None; a version without a manifest has nothing to compare (None)."""
    import mlflow

    from vitops.common.file_manifest import MANIFEST_FILE, ManifestError, read_manifest

    info = version_info(name, version)
    if not info.tags.get(MANIFEST_TAG):
        return None
    with tempfile.TemporaryDirectory(prefix="vitops-records-") as tmp, server_errors(f"reading {MANIFEST_FILE}"):
        mlflow.artifacts.download_artifacts(artifact_uri=f"{info.source}/{MANIFEST_FILE}", dst_path=tmp)
        try:
            records = read_manifest(Path(tmp), info.tags[MANIFEST_TAG]).get("records", {})
        except ManifestError as err:
            return str(err)
    edited = edited_tags(records, info.tags)
    return f"{edited_reason(edited[0], records, info.tags)} ({json.dumps(edited)})" if edited else None


def run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of an MLflow run, or None when there is no such run."""
    with server_errors(f"reading run {run_id}"):
        run = lookup(mlflow_client().get_run, run_id)
    return None if run is None else dict(run.data.tags)
