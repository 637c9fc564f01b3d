"""The model registry of vitops: versions with their serving artifacts, and checked, recorded alias moves.

One of the two modules that talk to MLflow (flows/tracking.py has the runs). It goes through `MlflowClient` and
explicit run ids, never the fluent active run, so callers may sit inside a flow's run.

Versions. `register_version` saves the pyfunc model of `flows/pyfunc_model.py` (shipped as code) with the model
folder, the ONNX export, every engine with its metadata and `serving.json` (the caller's bench numbers plus each
file's sha256), uploads it into the run under `pyfunc/` and registers it. Every input is checked before the
first write, so a refused registration leaves the registry as it was.

Aliases: `candidate` (passed the offline KPI gate), `pilot`, `champion`; MLflow itself reserves `latest` and
`v<digits>`. Promotion to `pilot` or `champion` reads the version's `gate.passed` tag (`true`/`false`, with
`gate.reasons`) and refuses a failed gate unless overridden with a reason. MLflow has no compare-and-swap
(`set_registered_model_alias` is a last-writer-wins upsert) and no alias history (mlflow#2169), so vitops builds
both on the one atomic operation the tracking server offers every machine: registered-model names are unique.
Move n of alias A of model M is the registered model `M.history.A.<n:06d>`, its tags the history entry. A mover

1. lists the history of (M, A), before reading the alias: in the other order, a move completing between the
   two reads would go unnoticed;
2. reads the alias (`get_registered_model`; `search_model_versions` shows no aliases, mlflow#16734);
3. finds the last entry uncompleted: a move in progress (refused) or, past `GRACE_S`, a crashed mover's, which
   it rolls forward;
4. checks `expect` against the alias;
5. claims entry n+1 with `create_registered_model`: the server lets one creator through and answers
   RESOURCE_ALREADY_EXISTS to the others, who lost the race (a random `claim` tag tells a retried request of
   the winner, MLflow's client retries POSTs too, from a rival's);
6. sets (or deletes) the alias and marks the entry completed.

Whoever claims n+1 first wins; a mover that read the history after that claim finds it uncompleted, or the
alias moved. An alias moved outside vitops (the last entry's target is not the registry's value) is noted in
the next entry, whose `from_version` is what the registry had.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.util
import json
import logging
import re
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ALIASES = ("candidate", "pilot", "champion")
GATED_ALIASES = ("pilot", "champion")
GRACE_S = 60.0  # an uncompleted history entry younger than this is a move in progress
HISTORY_TAG = "vitops.history"
PYFUNC_PATH = "pyfunc"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_HISTORY_NAME = re.compile(r"(?P<model>.+)\.history\.(?P<alias>[a-z]+)\.(?P<seq>\d{6,})")


class RegistryError(RuntimeError):
    """A request the registry refuses or cannot serve; the message names server, model, version and the fix."""


class MoveConflict(RegistryError):
    """An alias move that lost a race, met a move in progress, or found the alias elsewhere than `expect`."""


@dataclass
class MoveRecord:
    """One entry of an alias's history; a version is None where the alias was unset."""

    seq: int
    model: str
    alias: str
    from_version: str | None
    to_version: str | None
    time: str
    user: str
    host: str
    flow_run_id: str
    reason: str
    approval: dict[str, Any] | None
    override: bool
    completed: bool
    note: str = ""


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


def is_history_model(name: str) -> bool:
    """Whether a registered-model name is a vitops history entry (listings of real models skip these)."""
    return _HISTORY_NAME.fullmatch(name) is not None


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
    _check_name(name)
    if tags.get("gate.passed", "false") not in ("true", "false"):
        raise RegistryError(f"tag gate.passed must be 'true' or 'false', not {tags['gate.passed']!r}")
    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    meta = _check_model_dir(model_dir)
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: ONNX export not found; export the model first")
    entries = _serving_entries([Path(e) for e in engines], serving)
    client = _client()
    with _server(f"reading run {run_id}"):
        artifact_uri = client.get_run(run_id).info.artifact_uri
    with tempfile.TemporaryDirectory(prefix="vitops-register-") as tmp:
        folder = _save_pyfunc(Path(tmp), model_dir, onnx_path, entries, serving, meta)
        with _server(f"registering a version of {name} from run {run_id}"):
            if _lookup(client.get_registered_model, name) is None:
                _create(client, name)
            path = _free_artifact_path(client, run_id)
            client.log_artifacts(run_id, str(folder), path)
            version = client.create_model_version(
                name,
                source=f"{artifact_uri}/{path}",
                run_id=run_id,
                tags={k: str(v) for k, v in tags.items()},
                description=description,
            )
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def move_alias(
    name: str,
    alias: str,
    version: str | None,
    *,
    expect: str | None,
    reason: str,
    flow_run_id: str = "",
    approval: dict[str, Any] | None = None,
    override_gate: bool = False,
) -> MoveRecord:
    """Point `alias` of `name` at `version` (None removes it) if it still points at `expect`, and record it.

    Args:
        name: registered model.
        alias: one of `ALIASES`.
        version: the new holder, or None to remove the alias.
        expect: the version the alias must point at now, `"none"` for unset, or None for whatever it points at
            (internal moves such as `candidate` at registration).
        reason: why; kept in the history.
        flow_run_id: the Prefect flow run that moves it, if any.
        approval: the approval (who, when, comment, ...), kept as JSON.
        override_gate: let a version whose gate did not pass into `pilot` or `champion` (needs a reason).

    Raises:
        MoveConflict: the alias is not at `expect`, another move is in progress, or another move won the race.
        RegistryError: unknown model or version, an alias not allowed, a failed gate without override.
    """
    _check_name(name)
    _check_alias(alias)
    version = None if version is None else _version_number(version)
    wanted = None if expect is None else ("none" if str(expect).lower() == "none" else _version_number(expect))
    client = _client()
    _model(client, name)
    override = False
    if version is not None and alias in GATED_ALIASES:
        tags = _model_version(client, name, version).tags
        if tags.get("gate.passed") != "true":
            gate = f"gate.passed={tags.get('gate.passed', 'unset')}; reasons: {tags.get('gate.reasons') or 'none'}"
            if not override_gate:
                raise RegistryError(
                    f"version {version} of {name} did not pass the gate ({gate}): refusing to make it {alias}. "
                    "Override only with a reason, which the history keeps"
                )
            if not reason.strip():
                raise RegistryError(f"overriding the gate of {name} version {version} needs a reason")
            override = True
    elif version is not None:
        _model_version(client, name, version)
    return _move(client, name, alias, version, wanted, reason, flow_run_id, approval, override)


def history(name: str, alias: str | None = None) -> list[MoveRecord]:
    """Every recorded move of `alias` of `name` (of all aliases when None), oldest first."""
    _check_name(name)
    if alias is not None:
        _check_alias(alias)
    client = _client()
    _model(client, name)
    records = _entries(client, name, alias)  # one alias: in claim order
    return records if alias else sorted(records, key=lambda r: (r.time, r.alias, r.seq))


def rollback(name: str, alias: str = "champion", *, reason: str, flow_run_id: str = "") -> MoveRecord:
    """Give `alias` back to the version that held it before the current one, as a checked, recorded move.

    The earlier holder is the `from_version` of the entry that set the current one (so a second rollback
    undoes the first). Its gate is not asked again: it served before; a failed gate is recorded as an override.

    Raises:
        RegistryError: no reason, the alias is unset or has no earlier holder in the history.
    """
    _check_name(name)
    _check_alias(alias)
    if not reason.strip():
        raise RegistryError(f"a rollback of {alias} of {name} needs a reason")
    client = _client()
    current = _alias_of(client, name, alias)
    if current is None:
        raise RegistryError(f"{alias} of {name} is not set at {_uri()}: nothing to roll back")
    setter = next((r for r in reversed(_entries(client, name, alias)) if r.completed and r.to_version == current), None)
    if setter is None or setter.from_version is None:
        raise RegistryError(
            f"{alias} of {name} (version {current}) has no earlier holder in the vitops history: nothing to roll "
            f"back to; move it explicitly, expecting {current}"
        )
    passed = _model_version(client, name, setter.from_version).tags.get("gate.passed") == "true"
    override = alias in GATED_ALIASES and not passed
    note = f"rollback of entry {setter.seq}"
    return _move(client, name, alias, setter.from_version, current, reason, flow_run_id, None, override, note)


def version_info(name: str, ref: str) -> VersionInfo:
    """A version by number (`"3"`) or by alias (`"champion"`)."""
    _check_name(name)
    client = _client()
    aliases = _model(client, name).aliases or {}
    if not str(ref).isdigit():
        _check_alias(ref)
        if ref not in aliases:
            raise RegistryError(f"{ref} of {name} is not set at {_uri()}; its history says where it was")
    mv = _model_version(client, name, str(aliases[ref]) if ref in aliases else _version_number(ref))
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
    holds = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
    return VersionInfo(
        name, str(mv.version), mv.run_id or "", mv.source, dict(mv.tags), holds, mv.description or "", created
    )


def aliases(name: str) -> dict[str, str]:
    """Alias -> version of a registered model, as the registry has them now."""
    _check_name(name)
    return {k: str(v) for k, v in (_model(_client(), name).aliases or {}).items()}


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> dict[str, str]:
    """Set tags on a registered version (the pilot's records, an approval) and read them back from the server.

    Returns:
        All of the version's tags as the registry now has them, so a caller can check what landed.
    """
    _check_name(name)
    version = _version_number(version)
    client = _client()
    _model_version(client, name, version)
    with _server(f"tagging version {version} of {name}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, _tag_value(value))
    return dict(_model_version(client, name, version).tags)


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 5000 else text[:4990] + " [...]"  # MLflow's tag value limit


def lineage(name: str, ref: str) -> dict[str, Any]:
    """Where a version came from and where it went, as data for the CLI to format.

    Returns:
        `version` (VersionInfo as a dict: tags with data version, git commit, params hash, KPIs), `gate`
        (passed, reasons), `run` and `train_run` (params, metrics, tags; the training run from the tag
        `train_run_id`, None when absent or the same run), `serving` (serving.json), `engines` (each with target,
        precision, p50, sha256 and build metadata) and `moves` (every history entry to or from this version).
    """
    import mlflow

    info = version_info(name, ref)
    client = _client()
    train_run_id = info.tags.get("train_run_id", "")
    has_train_run = train_run_id not in ("", "None", "none", info.run_id)
    with (
        tempfile.TemporaryDirectory(prefix="vitops-lineage-") as tmp,
        _server(f"reading serving.json of {info.source}"),
    ):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{info.source}/artifacts/serving.json", dst_path=tmp)
        serving = json.loads(Path(local).read_text(encoding="utf-8"))
    return {
        "version": asdict(info),
        "gate": {"passed": info.tags.get("gate.passed"), "reasons": info.tags.get("gate.reasons")},
        "run": _run_data(client, info.run_id) if info.run_id else None,
        "train_run": _run_data(client, train_run_id) if has_train_run else None,
        "serving": serving,
        "engines": serving.get("engines", []),
        "moves": [asdict(r) for r in history(name) if info.version in (r.from_version, r.to_version)],
    }


# -- alias moves ------------------------------------------------------------------------------------------------


def _move(
    client: Any,
    name: str,
    alias: str,
    version: str | None,
    expect: str | None,
    reason: str,
    flow_run_id: str,
    approval: dict[str, Any] | None,
    override: bool,
    note: str = "",
) -> MoveRecord:
    entries = _entries(client, name, alias)  # (1) the history, then (2) the alias: this order matters
    current = _alias_of(client, name, alias)
    last = entries[-1] if entries else None
    if last is not None and not last.completed:  # (3)
        age = _age_s(last.time)
        if age < GRACE_S:
            raise MoveConflict(
                f"a move of {alias} of {name} is in progress (entry {last.seq}: {_v(last.from_version)} -> "
                f"{_v(last.to_version)} by {last.user}@{last.host}, {age:.0f} s ago); nothing moved. Retry once it "
                f"completes (an abandoned move is rolled forward after {GRACE_S:.0f} s)"
            )
        log.warning("rolling forward the abandoned move %d of %s of %s (%.0f s old)", last.seq, alias, name, age)
        _apply(client, last)
        current = _alias_of(client, name, alias)
    if expect is not None and expect != _v(current):  # (4)
        raise MoveConflict(
            f"{alias} of {name} points at {current or 'nothing'}, not {expect} as expected; nothing moved. "
            f"Check the history, then retry expecting {_v(current)} if the move is still wanted"
        )
    if version == current:
        raise RegistryError(f"{alias} of {name} already points at {current or 'nothing'}; nothing to move")
    if last is not None and last.to_version != current:
        outside = f"{alias} was moved outside vitops: history said {_v(last.to_version)}, registry had {_v(current)}"
        log.warning("%s: %s", name, outside)
        note = "; ".join(filter(None, [note, outside]))
    record = MoveRecord(
        seq=(last.seq if last else 0) + 1,
        model=name,
        alias=alias,
        from_version=current,
        to_version=version,
        time=datetime.now(UTC).isoformat(),
        user=_user(),
        host=socket.gethostname(),
        flow_run_id=flow_run_id,
        reason=reason,
        approval=approval,
        override=override,
        completed=False,
        note=note,
    )
    entry = _entry_name(record)
    description = f"vitops alias history: {alias} of {name} {_v(current)} -> {_v(version)} by {record.user}: {reason}"
    claim = uuid.uuid4().hex  # tells our own claim, seen again after a retried request, from a rival's
    with _server(f"claiming history entry {entry}"):  # (5) one creator of this name succeeds
        created = _create(client, entry, tags=_tags(record) | {"claim": claim}, description=description)
        if not created and client.get_registered_model(entry).tags.get("claim") != claim:
            raise MoveConflict(
                f"another move of {alias} of {name} won the race: entry {record.seq} ({entry}) exists; "
                "nothing moved. Check the history and retry"
            )
    _apply(client, record)  # (6)
    log.info("%s of %s: %s -> %s (entry %d)", alias, name, _v(current), _v(version), record.seq)
    return record


def _apply(client: Any, record: MoveRecord) -> None:
    """Set or remove the alias of a claimed entry, then mark the entry completed."""
    with _server(f"moving {record.alias} of {record.model} to {_v(record.to_version)}"):
        if record.to_version is None:
            client.delete_registered_model_alias(record.model, record.alias)  # no error when already unset
        else:
            client.set_registered_model_alias(record.model, record.alias, record.to_version)
        client.set_registered_model_tag(_entry_name(record), "completed", "true")
    record.completed = True


def _entries(client: Any, name: str, alias: str | None) -> list[MoveRecord]:
    prefix = f"{name}.history.{alias}." if alias else f"{name}.history."
    records, token = [], None
    with _server(f"reading the alias history of {name}"):
        while True:
            page = client.search_registered_models(f"name LIKE '{prefix}%'", max_results=1000, page_token=token)
            for rm in page:  # LIKE reads `_` as a wildcard (and ignores case on SQLite): keep exact matches
                match = _HISTORY_NAME.fullmatch(rm.name)
                if match and match["model"] == name and rm.tags.get(HISTORY_TAG) == "true":
                    records.append(_record(match, rm.tags))
            token = page.token
            if not token:
                return sorted(records, key=lambda r: (r.alias, r.seq))


def _entry_name(record: MoveRecord) -> str:
    return f"{record.model}.history.{record.alias}.{record.seq:06d}"


def _tags(record: MoveRecord) -> dict[str, str]:
    tags = {key: value for key, value in asdict(record).items() if isinstance(value, str)}
    return tags | {
        HISTORY_TAG: "true",
        "from_version": _v(record.from_version),
        "to_version": _v(record.to_version),
        "approval": json.dumps(record.approval, sort_keys=True) if record.approval else "",
        "override": str(record.override).lower(),
        "completed": str(record.completed).lower(),
    }


def _record(match: re.Match[str], tags: dict[str, str]) -> MoveRecord:
    text = {key: tags.get(key, "") for key in ("time", "user", "host", "flow_run_id", "reason", "note")}
    versions = {key: None if tags.get(key, "none") == "none" else tags[key] for key in ("from_version", "to_version")}
    return MoveRecord(
        seq=int(match["seq"]),
        model=match["model"],
        alias=match["alias"],
        approval=json.loads(tags["approval"]) if tags.get("approval") else None,
        override=tags.get("override") == "true",
        completed=tags.get("completed") == "true",
        **versions,
        **text,
    )


def _v(version: str | None) -> str:
    return "none" if version is None else version


def _age_s(stamp: str) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    except (TypeError, ValueError):
        return float("inf")  # unreadable time: treat the entry as abandoned


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


# -- registering ------------------------------------------------------------------------------------------------


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
        pairs.append((engine, entry | {"sha256": _sha256(engine), "meta": meta}))
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
        "onnx": {"file": "model.onnx", "sha256": _sha256(onnx_path)},
        "weights_sha256": _sha256(model_dir / "weights.safetensors"),
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


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- talking to the server --------------------------------------------------------------------------------------


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def _server(what: str) -> Iterator[None]:
    """Turn MLflow and connection errors into a RegistryError naming the server and what was being done."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except RegistryError:
        raise
    except (MlflowException, OSError) as err:  # requests' errors are OSErrors
        raise RegistryError(
            f"MLflow at {_uri()}: {what} failed: {getattr(err, 'message', err)}. Check that the tracking server "
            "is running and MLFLOW_TRACKING_URI points at it"
        ) from err


def _lookup(get: Any, *args: str) -> Any:
    """`get(*args)`, or None when MLflow says RESOURCE_DOES_NOT_EXIST."""
    from mlflow.exceptions import MlflowException

    try:
        return get(*args)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _create(client: Any, name: str, **kwargs: Any) -> bool:
    """Create a registered model; False when the name exists already (the server's unique constraint)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, **kwargs)
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def _model(client: Any, name: str) -> Any:
    with _server(f"reading registered model {name}"):
        model = _lookup(client.get_registered_model, name)
    if model is None:
        raise RegistryError(f"no registered model {name!r} at {_uri()}; check the name or register a version first")
    return model


def _model_version(client: Any, name: str, version: str) -> Any:
    with _server(f"reading version {version} of {name}"):
        found = _lookup(client.get_model_version, name, version)
    if found is None:
        _model(client, name)  # an unknown model says so, rather than "no such version"
        raise RegistryError(f"{name} has no version {version} at {_uri()}; list its versions in the MLflow UI")
    return found


def _alias_of(client: Any, name: str, alias: str) -> str | None:
    number = (_model(client, name).aliases or {}).get(alias)
    return None if number is None else str(number)


def _run_data(client: Any, run_id: str) -> dict[str, Any]:
    with _server(f"reading run {run_id}"):
        run = _lookup(client.get_run, run_id)
    if run is None:
        return {"run_id": run_id, "missing": True}
    return {"run_id": run_id, "params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags}


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name or "") or ".history." in name:
        raise RegistryError(
            f"bad registered model name {name!r}: use letters, digits, '.', '_' and '-' (at most 200), without "
            "'.history.' (vitops keeps alias history under such names)"
        )


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        reserved = " (MLflow itself reserves 'latest' and 'v<digits>')" if re.fullmatch(r"latest|v\d+", alias) else ""
        raise RegistryError(f"alias {alias!r} is not allowed{reserved}; vitops uses {', '.join(ALIASES)}")


def _version_number(version: str) -> str:
    if not str(version).isdigit():
        raise RegistryError(f"bad version {version!r}: a version is a number such as '3'")
    return str(int(version))
