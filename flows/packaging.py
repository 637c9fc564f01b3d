"""A version's pyfunc model: the model folder, the ONNX export, every engine with its metadata and
`serving.json` (the bench numbers plus each file's sha256), saved as the MLflow pyfunc model of
`flows/pyfunc_model.py` (shipped as code) and registered as a new version, with the manifest of every file of it
(`common/file_manifest.py`: each file's sha256, and the version's records) whose own sha256 is the version's tag
`manifest.sha256`, and the MLflow user who registered it (`vitops.registered_by`).

Every input is checked before the first write, so a refused registration leaves the registry as it was.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from vitops.common.file_manifest import write_manifest
from vitops.common.files import sha256_file
from vitops.flows.access import identity
from vitops.flows.registry import (
    MANIFEST_TAG,
    REGISTERED_BY_TAG,
    SIGNED_TAG,
    RegistryError,
    check_name,
    create_model,
    lookup,
    mlflow_client,
    server_errors,
)
from vitops.flows.signing import sign_folder

log = logging.getLogger(__name__)

PYFUNC_PATH = "pyfunc"


def register_version(
    name: str,
    run_id: str,
    model_dir: Path,
    onnx_path: Path,
    engines: list[Path],
    serving: dict[str, Any],
    tags: dict[str, str],
    description: str = "",
) -> str:
    """Register a new version of `name` (created if missing): a pyfunc model uploaded into run `run_id`.

    Args:
        name: registered model (one per use case).
        run_id: the run that gets the artifacts and owns the version.
        model_dir: a vitops model folder (`model.json` + `weights.safetensors`).
        onnx_path: the ONNX export.
        engines: engine files, each with its `<engine>.json` metadata beside it.
        serving: `{"engines": [{"file": "onnxruntime/int8.onnx", "target": ..., "precision": ..., "p50_ms": ...,
            "threads": ...}, ...]}`; `file` names the end of an engine's path. Engines without an entry are added
            from their metadata, unmeasured.
        tags: version tags (data version, git commit, params hash, KPIs, `gate.passed`, `gate.reasons`, ...).
        description: version description.

    Returns:
        The new version number.
    """
    check_name(name)
    if tags.get("gate.passed", "false") not in ("true", "false"):
        raise RegistryError(f"tag gate.passed must be 'true' or 'false', not {tags['gate.passed']!r}")
    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    meta = _check_model_dir(model_dir)
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: ONNX export not found; export the model first")
    entries = _serving_entries([Path(e) for e in engines], serving)
    client = mlflow_client()
    with server_errors(f"reading run {run_id}"):
        artifact_uri = client.get_run(run_id).info.artifact_uri
    tags = {k: str(v) for k, v in tags.items()} | {REGISTERED_BY_TAG: identity().user}
    with tempfile.TemporaryDirectory(prefix="vitops-register-") as tmp:
        folder = _save_pyfunc(Path(tmp), model_dir, onnx_path, entries, serving, meta)
        tags[MANIFEST_TAG] = write_manifest(folder, records=tags)  # the records, as registered, in the manifest
        signed = sign_folder(folder)  # with VITOPS_SIGNING_KEY: the folder, manifest included
        if signed:
            tags[SIGNED_TAG] = signed
        with server_errors(f"registering a version of {name} from run {run_id}"):
            if lookup(client.get_registered_model, name) is None:
                create_model(client, name)
            path = _free_artifact_path(client, run_id)
            client.log_artifacts(run_id, str(folder), path)
            version = client.create_model_version(
                name,
                source=f"{artifact_uri}/{path}",
                run_id=run_id,
                tags=tags,
                description=description[:5000],  # the SQL store's column
            )
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def _check_model_dir(model_dir: Path) -> dict[str, Any]:
    missing = [f for f in ("model.json", "weights.safetensors") if not (model_dir / f).is_file()]
    if missing:
        raise RegistryError(f"{model_dir}: not a complete vitops model folder, missing {', '.join(missing)}")
    try:
        meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        _ = meta["classes"], int(meta["img_size"]), meta["mean"], meta["std"]
    except (ValueError, KeyError, TypeError) as err:
        raise RegistryError(f"{model_dir}/model.json: unreadable model metadata ({err})") from err
    return meta


def _serving_entries(engines: list[Path], serving: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Pair each engine with its serving entry, checked against the engine's metadata."""
    given = [dict(e) for e in serving.get("engines", [])]
    pairs: list[tuple[Path, dict[str, Any]]] = []
    for engine in engines:
        if not engine.is_file() or not Path(f"{engine}.json").is_file():
            raise RegistryError(f"{engine}: engine file or its metadata {engine.name}.json is missing; rebuild it")
        try:
            meta = json.loads(Path(f"{engine}.json").read_text(encoding="utf-8"))
            _ = meta["target"], meta["precision"]
        except (ValueError, KeyError, TypeError) as err:
            raise RegistryError(f"{engine}.json: unreadable engine metadata ({err}); rebuild the engine") from err
        matches = [e for e in given if engine.as_posix() == e["file"] or engine.as_posix().endswith(f"/{e['file']}")]
        if len(matches) > 1:
            raise RegistryError(f"{engine}: matched by several serving entries {[e['file'] for e in matches]}")
        entry = matches[0] if matches else {"file": f"{meta['target']}/{engine.name}", "p50_ms": None}
        for key in ("target", "precision"):
            if entry.setdefault(key, meta[key]) != meta[key]:
                raise RegistryError(f"{engine}: serving says {key} {entry[key]!r}, its metadata {meta[key]!r}")
        entry.setdefault("threads", (meta.get("extra") or {}).get("threads") or 0)
        pairs.append((engine, entry | {"sha256": sha256_file(engine), "meta": meta}))
    unmatched = [e["file"] for e in given if not any(e["file"] == entry["file"] for _, entry in pairs)]
    if unmatched:
        raise RegistryError(f"serving entries {unmatched} match none of the engines {[str(e) for e in engines]}")
    files = [entry["file"] for _, entry in pairs]
    if len(set(files)) != len(files) or any(".." in Path(f).parts or Path(f).is_absolute() for f in files):
        raise RegistryError(f"engine files must be distinct relative paths, got {files}")
    return pairs


def _save_pyfunc(
    tmp: Path,
    model_dir: Path,
    onnx_path: Path,
    entries: list[tuple[Path, dict[str, Any]]],
    serving: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Stage the artifacts in `tmp` and save the pyfunc model into `tmp/pyfunc`."""
    stage = tmp / "stage"
    shutil.copytree(model_dir, stage / "model")
    shutil.copy2(onnx_path, stage / "model.onnx")
    for engine, entry in entries:
        dst = stage / "engines" / entry["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(engine, dst)
        shutil.copy2(f"{engine}.json", f"{dst}.json")
    doc = serving | {
        "engines": [entry for _, entry in entries],
        "onnx": {"file": "model.onnx", "sha256": sha256_file(onnx_path)},
        "weights_sha256": sha256_file(model_dir / "weights.safetensors"),
    }
    (stage / "serving.json").write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
    artifacts = {"model": stage / "model", "onnx": stage / "model.onnx", "serving": stage / "serving.json"}
    if entries:
        artifacts["engines"] = stage / "engines"
    paths = {key: str(path) for key, path in artifacts.items()}
    # MLflow warns on every save that a pickled python_model is code; ours is our own class from code_paths.
    quiet = logging.getLogger("mlflow.pyfunc")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        return _pyfunc_module().save(tmp / PYFUNC_PATH, paths, list(meta["classes"]), int(meta["img_size"]))
    finally:
        quiet.setLevel(level)


def _pyfunc_module() -> Any:
    # Imported from its file as the top-level module `pyfunc_model`, so cloudpickle records the class as
    # `pyfunc_model.ImageClassifier`: the name a loader finds in the model's code/ folder. Recorded as
    # `flows.pyfunc_model`, every loader would need (and import) the flows package.
    path = Path(__file__).with_name("pyfunc_model.py").resolve()
    module = sys.modules.get("pyfunc_model")
    if module is None or Path(module.__file__ or "").resolve() != path:
        spec = importlib.util.spec_from_file_location("pyfunc_model", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["pyfunc_model"] = module
        spec.loader.exec_module(module)
    return module


def _free_artifact_path(client: Any, run_id: str) -> str:
    # A second registration from the same run must not overwrite the artifacts of the first version.
    path, n = PYFUNC_PATH, 1
    while client.list_artifacts(run_id, path):
        n += 1
        path = f"{PYFUNC_PATH}-{n}"
    return path
