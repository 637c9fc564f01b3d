"""Verified artifacts: a version's manifest names every file with its sha256 and the records it was registered
with; a file changed in the artifact store (or a gate tag edited in the UI) is refused by the pyfunc load, by the
registry's loader and by `vitops verify`, each naming what differs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers.registry import Release, build_release, register, unique
from mlflow import MlflowClient

from vitops.common.file_manifest import MANIFEST_FILE, ManifestError, check_folder, read_manifest, write_manifest
from vitops.flows import registry


def test_a_changed_missing_or_added_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "int8.onnx").write_bytes(b"weights" * 100)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    digest = write_manifest(tmp_path, {"gate.passed": "true"})
    manifest = read_manifest(tmp_path, digest)
    assert check_folder(tmp_path, manifest) == 2 and manifest["records"] == {"gate.passed": "true"}

    (tmp_path / "engines" / "int8.onnx").write_bytes(b"weightz" * 100)  # same size, other bytes
    with pytest.raises(ManifestError, match=r"^engines/int8.onnx: sha256 .* differs from the manifest"):
        check_folder(tmp_path, manifest)
    (tmp_path / "engines" / "int8.onnx").unlink()
    with pytest.raises(ManifestError, match=r"^engines/int8.onnx: missing"):
        check_folder(tmp_path, manifest)
    (tmp_path / "engines" / "int8.onnx").write_bytes(b"weights" * 100)
    (tmp_path / "engines" / "extra.onnx").write_bytes(b"planted")
    with pytest.raises(ManifestError, match=r"^engines/extra.onnx: not in the version's manifest"):
        check_folder(tmp_path, manifest)
    (tmp_path / MANIFEST_FILE).write_text((tmp_path / MANIFEST_FILE).read_text().replace("true", "fals"))
    with pytest.raises(ManifestError, match="differs from the version's record manifest.sha256"):
        read_manifest(tmp_path, digest)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return build_release(tmp_path_factory.mktemp("release"), seed=5)


def _stored(basetemp: Path, version: registry.VersionInfo, rel: str) -> Path:
    """The file `rel` of a version's pyfunc folder where the session's MLflow server keeps it (conftest's
    `mlflow_server` stores artifacts under the session's temporary folder)."""
    roots = sorted(basetemp.glob("mlflow-server[0-9]*/artifacts"))
    found = [p for root in roots for p in root.rglob(f"{version.run_id}/artifacts/pyfunc/{rel}")]
    assert len(found) == 1, found
    return found[0]


def _vitops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitops", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_a_tampered_engine_is_refused_by_every_loader_and_by_verify(
    server: str, release: Release, tmp_path_factory: pytest.TempPathFactory
) -> None:
    name = unique("tampered")
    version = register(name, release)
    info = registry.version_info(name, version)
    assert info.tags[registry.MANIFEST_TAG] and info.tags[registry.REGISTERED_BY_TAG] == "unauthenticated"
    ok = _vitops("verify", f"{name}/{version}")
    assert ok.returncode == 0, ok.stderr
    assert "files match its manifest" in ok.stdout and "registered by unauthenticated" in ok.stdout
    registry.load_pyfunc(name, version)  # intact: loads

    engine = _stored(tmp_path_factory.getbasetemp(), info, "artifacts/engines/onnxruntime/fp32.onnx")
    data = bytearray(engine.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # the last weights inverted, the size kept
    engine.write_bytes(bytes(data))
    rel = "artifacts/engines/onnxruntime/fp32.onnx"
    with pytest.raises(registry.ArtifactCheckError, match=rf"{rel}: sha256 .* differs from the manifest"):
        registry.load_pyfunc(name, version)
    with pytest.raises(Exception, match=rf"{rel}: sha256 .* differs from the manifest"):
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")  # MLflow's own loader: the pyfunc model checks too
    refused = _vitops("verify", f"{name}/{version}")
    assert refused.returncode == 1 and f"REFUSED: {rel}: sha256" in refused.stderr, refused.stderr

    other = register(name, release)  # an intact version whose gate tag someone edits in the UI
    MlflowClient().set_model_version_tag(name, other, "gate.passed", "false")
    edited = _vitops("verify", f"{name}/{other}")
    assert edited.returncode == 1
    assert "tag gate.passed is 'false' in the registry, 'true' in the version's manifest" in edited.stderr


def _keys(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "signing-key.pem", folder / "verify-key.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public


@pytest.mark.integration
def test_a_signed_version_verifies_and_an_unsigned_or_forged_one_is_refused(
    server: str, release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitops.flows.signing import SIGN_KEY_ENV, VERIFY_KEY_ENV

    private, public = _keys(tmp_path)
    name = unique("signed")
    unsigned = register(name, release)
    monkeypatch.setenv(SIGN_KEY_ENV, str(private))
    signed = register(name, release)
    assert registry.version_info(name, signed).tags[registry.SIGNED_TAG] == "signing-key.pem"
    monkeypatch.delenv(SIGN_KEY_ENV)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    registry.load_pyfunc(name, signed)  # verifies with the public key
    with pytest.raises(registry.ArtifactCheckError, match="the version is unsigned"):
        registry.load_pyfunc(name, unsigned)
    (tmp_path / "other").mkdir()
    _, other = _keys(tmp_path / "other")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(other))  # someone else's key: the signature does not verify
    with pytest.raises(registry.ArtifactCheckError, match="does not verify with VITOPS_VERIFY_KEY"):
        registry.load_pyfunc(name, signed)
