"""The model registry's versions: reading them, tagging them, loading their pyfunc model, and the vocabulary
(aliases, names) that `flows/aliases.py` (checked alias moves and their history) and `flows/packaging.py` (a
version's pyfunc model, registered) build on.

With `flows/tracking.py` these are the only modules that talk to MLflow. They go through `MlflowClient` and
explicit run ids, never the fluent active run, so callers may sit inside a flow's run.

Aliases: `candidate` (passed the offline KPI gate), `pilot`, `champion`; MLflow itself reserves `latest` and
`v<digits>`. Promotion to `pilot` or `champion` reads the version's `gate.passed` tag (`true`/`false`, with
`gate.reasons`) and refuses a failed gate unless overridden with a reason (`flows/aliases.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ALIASES = ("candidate", "pilot", "champion")
MANIFEST_TAG = "manifest.sha256"  # the sha256 of the version's vitops_manifest.json (common/file_manifest.py)
REGISTERED_BY_TAG = "vitops.registered_by"  # the MLflow user who registered it, or "unauthenticated"
SIGNED_TAG = "manifest.signed_with"  # the key file that signed the folder (flows/signing.py), where one did
GATED_ALIASES = ("pilot", "champion")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class RegistryError(RuntimeError):
    """A request the registry refuses or cannot serve; the message names server, model, version and the fix."""


@dataclass
class VersionInfo:
    """A registered version as the registry sees it."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str]
    aliases: list[str]
    description: str
    created: str


def version_info(name: str, ref: str) -> VersionInfo:
    """A version by number (`"3"`) or by alias (`"champion"`)."""
    check_name(name)
    client = mlflow_client()
    aliases = read_model(client, name).aliases or {}
    if not str(ref).isdigit():
        check_alias(ref)
        if ref not in aliases:
            raise RegistryError(f"{ref} of {name} is not set at {server_uri()}; its history says where it was")
    mv = read_version(client, name, str(aliases[ref]) if ref in aliases else version_number(ref))
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
    holds = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
    return VersionInfo(
        name, str(mv.version), mv.run_id or "", mv.source, dict(mv.tags), holds, mv.description or "", created
    )


def version_facts(name: str, ref: str) -> dict[str, Any]:
    """A version's records, as data: `version` (VersionInfo as a dict: tags with data version, git commit, params
    hash, KPIs), `gate` (passed, reasons), `run` and `train_run` (params, metrics, tags; the training run from the
    tag `train_run_id`, None when absent or the same run), `serving` (serving.json) and `engines` (each with
    target, precision, p50, sha256 and build metadata)."""
    import mlflow

    info = version_info(name, ref)
    client = mlflow_client()
    train_run_id = info.tags.get("train_run_id", "")
    has_train_run = train_run_id not in ("", "None", "none", info.run_id)
    with (
        tempfile.TemporaryDirectory(prefix="vitops-lineage-") as tmp,
        server_errors(f"reading serving.json of {info.source}"),
    ):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{info.source}/artifacts/serving.json", dst_path=tmp)
        serving = json.loads(Path(local).read_text(encoding="utf-8"))
    return {
        "version": asdict(info),
        "gate": {"passed": info.tags.get("gate.passed"), "reasons": info.tags.get("gate.reasons")},
        "run": run_data(client, info.run_id) if info.run_id else None,
        "train_run": run_data(client, train_run_id) if has_train_run else None,
        "serving": serving,
        "engines": serving.get("engines", []),
    }


def current_aliases(name: str) -> dict[str, str]:
    """Alias -> version of a registered model, as the registry has them now."""
    check_name(name)
    return {k: str(v) for k, v in (read_model(mlflow_client(), name).aliases or {}).items()}


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> dict[str, str]:
    """Set tags on a registered version (the pilot's records, an approval) and read them back from the server.

    Returns:
        All of the version's tags as the registry now has them, so a caller can check what landed.
    """
    check_name(name)
    version = version_number(version)
    client = mlflow_client()
    read_version(client, name, version)
    with server_errors(f"tagging version {version} of {name}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, _tag_value(value))
    return dict(read_version(client, name, version).tags)


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 5000 else text[:4990] + " [...]"  # MLflow's tag value limit


def load_pyfunc(name: str, version: str) -> Any:
    """The version's pyfunc `ImageClassifier` (`flows/pyfunc_model.py`), downloaded from the registry and checked
    against its manifest (`fetch_version`) before it loads.

    Raises:
        ArtifactCheckError: a file differs from the version's manifest (named), or a record was edited.
        RegistryError: the version cannot be downloaded or loaded; the message names the server.
    """
    # Left in place, as MLflow leaves its own downloads: an engine may read its file after the load.
    path = fetch_version(name, version, Path(tempfile.mkdtemp(prefix="vitops-load-")))
    return load_local_pyfunc(path)[0].unwrap_python_model()


class ArtifactCheckError(RegistryError):
    """A version's downloaded files do not match its sha256 records: it must not be served."""


def fetch_version(name: str, version: str, cache: Path) -> Path:
    """The version's pyfunc model in `cache/<name>/<version>`, downloaded unless an intact copy is there, with
    every file checked against the version's manifest (`check_artifacts`).

    A download goes to a partial folder first and is renamed into place only after its check, so a crash or a
    refused version never leaves a folder that looks served.

    Raises:
        ArtifactCheckError: a file is missing or its sha256 differs from the record.
        RegistryError: the version cannot be read or downloaded (the server is down, the version is gone).
    """
    import mlflow

    check_name(name)
    version = version_number(version)
    tags = dict(read_version(mlflow_client(), name, version).tags)
    final = Path(cache).expanduser() / name / version
    if final.is_dir():
        try:
            check_artifacts(final, tags)
            return final
        except ArtifactCheckError as err:
            log.warning("cached %s version %s is damaged (%s); downloading it again", name, version, err)
            shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=final.parent))
    try:
        with server_errors(f"downloading version {version} of {name}"):
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
        local = partial if (partial / "MLmodel").is_file() else next(p.parent for p in partial.rglob("MLmodel"))
        check_artifacts(local, tags)
        os.replace(local, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def check_artifacts(model_dir: Path, tags: dict[str, str]) -> int:
    """Check a downloaded version against its manifest (`manifest.sha256`): the manifest is the one registered,
    every file is in it with its sha256 and none was added, and the records it holds (gate verdict, KPIs, data
    and code versions, who registered it) are still the version's tags; how many files were checked.

    A version registered before vitops wrote manifests has each file `serving.json` records (engines, ONNX export,
    weights) checked against its sha256, and the weights against the version's `weights_sha256` tag. With
    `VITOPS_VERIFY_KEY` set, the folder's signature must verify first (`flows/signing.py`).

    Raises:
        ArtifactCheckError: the first file or record that differs, named.
    """
    from vitops.common.file_manifest import ManifestError, check_folder, read_manifest
    from vitops.common.files import sha256_file
    from vitops.flows.signing import SignatureError, verify_folder

    try:
        verify_folder(Path(model_dir))  # with VITOPS_VERIFY_KEY: signed with its key, or refused
    except SignatureError as err:
        raise ArtifactCheckError(str(err)) from None
    if tags.get(MANIFEST_TAG):
        try:
            manifest = read_manifest(Path(model_dir), tags[MANIFEST_TAG])
            checked = check_folder(Path(model_dir), manifest)
        except ManifestError as err:
            raise ArtifactCheckError(str(err)) from None
        records = manifest.get("records", {})
        if edited := edited_tags(records, tags):
            raise ArtifactCheckError(edited_reason(edited[0], records, tags))
        return checked
    log.warning("%s has no manifest (registered before vitops wrote one): checked against serving.json", model_dir)
    art = Path(model_dir) / "artifacts"
    try:
        serving = json.loads((art / "serving.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ArtifactCheckError(f"{model_dir}: no readable serving.json ({err})") from None
    records = {f"engines/{e.get('file')}": e.get("sha256") for e in serving.get("engines", [])}
    records["model.onnx"] = (serving.get("onnx") or {}).get("sha256")
    records["model/weights.safetensors"] = serving.get("weights_sha256")
    tagged = tags.get("weights_sha256")
    if tagged and tagged != records["model/weights.safetensors"]:
        raise ArtifactCheckError(f"serving.json's weights sha256 differs from the version's tag {tagged[:12]}...")
    for rel, expected in records.items():
        path = art / rel
        if not expected:
            raise ArtifactCheckError(f"{rel} has no sha256 record in serving.json")
        if not path.is_file():
            raise ArtifactCheckError(f"{rel} is missing from the downloaded version")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactCheckError(f"{rel}: sha256 {actual[:12]}... differs from its record {expected[:12]}...")
    return len(records)


def edited_tags(records: dict[str, str], tags: dict[str, str]) -> list[str]:
    """The keys of the records a version's manifest holds whose tag now says otherwise, sorted."""
    return sorted(key for key, value in records.items() if tags.get(key) != value)


def edited_reason(key: str, records: dict[str, str], tags: dict[str, str]) -> str:
    """One sentence on an edited record: its tag now, and the value the manifest holds."""
    return (
        f"tag {key} is {tags.get(key)!r} in the registry, {records[key]!r} in the version's manifest: it was edited "
        "after registration"
    )


def load_local_pyfunc(model_dir: Path) -> tuple[Any, Any]:
    """The pyfunc model saved in `model_dir` (MLflow's loader, with the version's own `pyfunc_model` code) and its
    input example, for a process that may already hold another version.

    Raises:
        RegistryError: MLflow cannot load the folder.
    """
    import sys

    import mlflow
    from mlflow.models import Model

    # Each version ships its own pyfunc_model.py; a cached module of another version would unpickle this one's
    # model with that version's code. The other version's objects keep the module they were built with.
    sys.modules.pop("pyfunc_model", None)
    try:
        model = mlflow.pyfunc.load_model(str(model_dir))
        example = Model.load(str(model_dir)).load_input_example(str(model_dir))
    except Exception as err:  # MlflowException, ImportError, an engine this machine cannot open
        raise RegistryError(f"cannot load the pyfunc model in {model_dir}: {err}") from err
    return model, example


# -- talking to the server --------------------------------------------------------------------------------------


def mlflow_client() -> Any:
    from mlflow import MlflowClient

    from vitops.flows.connection import bound_mlflow_retries, connect_timeout

    bound_mlflow_retries(connect_timeout())  # a server that goes away fails within the limit, not in 250 s

    return MlflowClient()


def server_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def server_errors(what: str) -> Iterator[None]:
    """Turn MLflow and connection errors into a RegistryError naming the server and what was being done."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except RegistryError:
        raise
    except (MlflowException, OSError) as err:  # requests' errors are OSErrors
        code = getattr(err, "error_code", "")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):  # an authenticating server said no
            who = os.environ.get("MLFLOW_TRACKING_USERNAME") or "a caller without credentials"
            raise RegistryError(
                f"MLflow at {server_uri()}: {what} was refused to {who} ({code}: {getattr(err, 'message', err)}). "
                "Ask an MLflow admin for the permission on the model, or use credentials that hold it"
            ) from err
        raise RegistryError(
            f"MLflow at {server_uri()}: {what} failed: {getattr(err, 'message', err)}. Check that the tracking "
            "server is running and MLFLOW_TRACKING_URI points at it"
        ) from err


def lookup(get: Any, *args: str) -> Any:
    """`get(*args)`, or None when MLflow says RESOURCE_DOES_NOT_EXIST."""
    from mlflow.exceptions import MlflowException

    try:
        return get(*args)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def create_model(client: Any, name: str, **kwargs: Any) -> bool:
    """Create a registered model; False when the name exists already (the server's unique constraint)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, **kwargs)
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def create_experiment(client: Any, name: str, tags: dict[str, str]) -> str | None:
    """Create an experiment; its id, or None when the name is taken (deleted experiments keep theirs)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, tags=tags)
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":
            return None
        raise


def ensure_experiment(client: Any, name: str, description: str) -> str:
    """The id of the active experiment `name`, created (with its description) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage != "active":
        raise RegistryError(f"the experiment {name} is deleted at {server_uri()}: `mlflow experiments restore` it")
    if found is not None:
        return found.experiment_id
    created = create_experiment(client, name, {"mlflow.note.content": description})
    return created or client.get_experiment_by_name(name).experiment_id  # or another process created it first


def delete_experiment(client: Any, experiment_id: str) -> None:
    """Soft-delete an experiment (its name stays reserved); no error when it is deleted already."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_experiment(experiment_id)
    except MlflowException as err:
        log.debug("experiment %s already deleted: %s", experiment_id, err)


def all_pages(search: Any, **kwargs: Any) -> list[Any]:
    """Every result of an MLflow search (`search_runs`, `search_experiments`, ...), page by page."""
    items, token = [], None
    while True:
        page = search(max_results=1000, page_token=token, **kwargs)
        items += list(page)
        token = page.token
        if not token:
            return items


def show_aliases(client: Any, name: str, tag: str) -> None:
    """Tag the registered model with its aliases, champion first (MLflow's model list shows only the newest
    version's alias, so `champion` hides behind `+2` there); display only, the registry's aliases are the truth."""
    held = read_model(client, name).aliases or {}
    shown = " · ".join(f"{a} v{held[a]}" for a in reversed(ALIASES) if a in held)
    client.set_registered_model_tag(name, tag, shown or "none")


def read_model(client: Any, name: str) -> Any:
    with server_errors(f"reading registered model {name}"):
        model = lookup(client.get_registered_model, name)
    if model is None:
        raise RegistryError(
            f"no registered model {name!r} at {server_uri()}; check the name or register a version first"
        )
    return model


def read_version(client: Any, name: str, version: str) -> Any:
    with server_errors(f"reading version {version} of {name}"):
        found = lookup(client.get_model_version, name, version)
    if found is None:
        read_model(client, name)  # an unknown model says so, rather than "no such version"
        raise RegistryError(f"{name} has no version {version} at {server_uri()}; list its versions in the MLflow UI")
    return found


def alias_holder(client: Any, name: str, alias: str) -> str | None:
    number = (read_model(client, name).aliases or {}).get(alias)
    return None if number is None else str(number)


def run_data(client: Any, run_id: str) -> dict[str, Any]:
    with server_errors(f"reading run {run_id}"):
        run = lookup(client.get_run, run_id)
    if run is None:
        return {"run_id": run_id, "missing": True}
    return {"run_id": run_id, "params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags}


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name or "") or ".history." in name:
        raise RegistryError(
            f"bad registered model name {name!r}: use letters, digits, '.', '_' and '-' (at most 200), without "
            "'.history.' (vitops keeps alias history under such names)"
        )


def check_alias(alias: str) -> None:
    if alias not in ALIASES:
        reserved = " (MLflow itself reserves 'latest' and 'v<digits>')" if re.fullmatch(r"latest|v\d+", alias) else ""
        raise RegistryError(f"alias {alias!r} is not allowed{reserved}; vitops uses {', '.join(ALIASES)}")


def version_number(version: str) -> str:
    if not str(version).isdigit():
        raise RegistryError(f"bad version {version!r}: a version is a number such as '3'")
    return str(int(version))
