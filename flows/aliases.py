"""Checked, recorded alias moves of the model registry, their history, and a version's lineage.

MLflow has no compare-and-swap (`set_registered_model_alias` is a last-writer-wins upsert) and no alias history
(mlflow#2169), so vitops builds both on the one atomic operation the tracking server offers every machine:
registered-model names are unique. Move n of alias A of model M is the registered model `M.history.A.<n:06d>`,
its tags the history entry. A mover

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

import getpass
import json
import logging
import re
import socket
import tempfile
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitops.flows.registry import (
    GATED_ALIASES,
    RegistryError,
    alias_holder,
    check_alias,
    check_name,
    create_model,
    mlflow_client,
    read_model,
    read_version,
    run_data,
    server_errors,
    server_uri,
    version_info,
    version_number,
)

log = logging.getLogger(__name__)

GRACE_S = 60.0  # an uncompleted history entry younger than this is a move in progress
HISTORY_TAG = "vitops.history"
_HISTORY_NAME = re.compile(r"(?P<model>.+)\.history\.(?P<alias>[a-z]+)\.(?P<seq>\d{6,})")


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


def is_history_model(name: str) -> bool:
    """Whether a registered-model name is a vitops history entry (listings of real models skip these)."""
    return _HISTORY_NAME.fullmatch(name) is not None


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
    check_name(name)
    check_alias(alias)
    version = None if version is None else version_number(version)
    wanted = None if expect is None else ("none" if str(expect).lower() == "none" else version_number(expect))
    client = mlflow_client()
    read_model(client, name)
    override = False
    if version is not None and alias in GATED_ALIASES:
        tags = read_version(client, name, version).tags
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
        read_version(client, name, version)
    return _move(client, name, alias, version, wanted, reason, flow_run_id, approval, override)


def history(name: str, alias: str | None = None) -> list[MoveRecord]:
    """Every recorded move of `alias` of `name` (of all aliases when None), oldest first."""
    check_name(name)
    if alias is not None:
        check_alias(alias)
    client = mlflow_client()
    read_model(client, name)
    records = _entries(client, name, alias)  # one alias: in claim order
    return records if alias else sorted(records, key=lambda r: (r.time, r.alias, r.seq))


def rollback(name: str, alias: str = "champion", *, reason: str, flow_run_id: str = "") -> MoveRecord:
    """Give `alias` back to the version that held it before the current one, as a checked, recorded move.

    The earlier holder is the `from_version` of the entry that set the current one (so a second rollback
    undoes the first). Its gate is not asked again: it served before; a failed gate is recorded as an override.

    Raises:
        RegistryError: no reason, the alias is unset or has no earlier holder in the history.
    """
    check_name(name)
    check_alias(alias)
    if not reason.strip():
        raise RegistryError(f"a rollback of {alias} of {name} needs a reason")
    client = mlflow_client()
    current = alias_holder(client, name, alias)
    if current is None:
        raise RegistryError(f"{alias} of {name} is not set at {server_uri()}: nothing to roll back")
    setter = next((r for r in reversed(_entries(client, name, alias)) if r.completed and r.to_version == current), None)
    if setter is None or setter.from_version is None:
        raise RegistryError(
            f"{alias} of {name} (version {current}) has no earlier holder in the vitops history: nothing to roll "
            f"back to; move it explicitly, expecting {current}"
        )
    passed = read_version(client, name, setter.from_version).tags.get("gate.passed") == "true"
    override = alias in GATED_ALIASES and not passed
    note = f"rollback of entry {setter.seq}"
    return _move(client, name, alias, setter.from_version, current, reason, flow_run_id, None, override, note)


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
    current = alias_holder(client, name, alias)
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
        current = alias_holder(client, name, alias)
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
    with server_errors(f"claiming history entry {entry}"):  # (5) one creator of this name succeeds
        created = create_model(client, entry, tags=_tags(record) | {"claim": claim}, description=description)
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
    with server_errors(f"moving {record.alias} of {record.model} to {_v(record.to_version)}"):
        if record.to_version is None:
            client.delete_registered_model_alias(record.model, record.alias)  # no error when already unset
        else:
            client.set_registered_model_alias(record.model, record.alias, record.to_version)
        client.set_registered_model_tag(_entry_name(record), "completed", "true")
    record.completed = True


def _entries(client: Any, name: str, alias: str | None) -> list[MoveRecord]:
    prefix = f"{name}.history.{alias}." if alias else f"{name}.history."
    records, token = [], None
    with server_errors(f"reading the alias history of {name}"):
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
