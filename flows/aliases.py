"""Checked, recorded alias moves of the model registry, their history, and a version's lineage.

MLflow has no compare-and-swap (`set_registered_model_alias` is a last-writer-wins upsert) and no alias history
(mlflow#2169), so vitops builds both on an operation the tracking server makes atomic for every machine:
experiment names are unique, deleted experiments included (a soft-deleted name stays reserved on the SQL store).
Move n of alias A of model M is claimed as the experiment `vitops.alias-claim/M/A/<n:06d>`, its tags the entry.
A mover

1. reads the history of (M, A): the claims in progress, then the ledger of completed moves (one run per move in
   the experiment `vitops-alias-history`, which people read in the MLflow UI) and the entries older vitops
   versions kept as registered models `M.history.A.<n:06d>` (still read; `migrate_history` moves them into the
   ledger); before reading the alias: in the other order, a move completing between the two reads would go
   unnoticed;
2. reads the alias (`get_registered_model`; `search_model_versions` shows no aliases, mlflow#16734);
3. finds the last entry uncompleted: a move in progress (refused) or, past `GRACE_S`, a crashed mover's, which
   it rolls forward;
4. checks `expect` against the alias;
5. claims entry n+1 with `create_experiment`: the server lets one creator through and answers
   RESOURCE_ALREADY_EXISTS to the others, who lost the race (a random `claim` tag tells a retried request of
   the winner, MLflow's client retries POSTs too, from a rival's);
6. sets (or deletes) the alias, logs the move in the ledger and soft-deletes the claim, so neither the model
   list nor the experiment list keeps it.

Whoever claims n+1 first wins; a mover that read the history after that claim finds it uncompleted, or the
alias moved. An alias moved outside vitops (the last entry's target is not the registry's value) is noted in
the next entry, whose `from_version` is what the registry had. After each move the registered model's tag
`vitops.aliases` lists its aliases, champion first: MLflow's model list shows only the alias of the newest
version.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from vitops.flows.access import who
from vitops.flows.registry import (
    GATED_ALIASES,
    RegistryError,
    alias_holder,
    all_pages,
    check_alias,
    check_name,
    create_experiment,
    delete_experiment,
    ensure_experiment,
    lookup,
    mlflow_client,
    read_model,
    read_version,
    server_errors,
    server_uri,
    show_aliases,
    version_facts,
    version_number,
)

log = logging.getLogger(__name__)

GRACE_S = 60.0  # an uncompleted history entry younger than this is a move in progress
HISTORY_TAG = "vitops.history"
CLAIM_PREFIX = "vitops.alias-claim"  # + /<model>/<alias>/<seq>: the experiment name that claims a move
LEDGER = "vitops-alias-history"  # the experiment of the completed moves, one run each
ALIASES_TAG = "vitops.aliases"  # on the registered model: its aliases, champion first, for the model list
PILOT_OVERRIDE = "pilot override: champion moved outside a pilot, without its approval"  # an entry's note
_CLAIM_NAME = re.compile(re.escape(CLAIM_PREFIX) + r"/(?P<model>[^/]+)/(?P<alias>[a-z]+)/(?P<seq>\d{6,})")
_HISTORY_NAME = re.compile(r"(?P<model>.+)\.history\.(?P<alias>[a-z]+)\.(?P<seq>\d{6,})")  # older vitops


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
    """Whether a registered-model name is a history entry of an older vitops (listings of real models skip these;
    `migrate_history` moves them into the ledger)."""
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
    note: str = "",
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
        note: kept with the entry (e.g. `PILOT_OVERRIDE`: champion moved outside a pilot).

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
    return _move(client, name, alias, version, wanted, reason, flow_run_id, approval, override, note)


def history(name: str, alias: str | None = None) -> list[MoveRecord]:
    """Every recorded move of `alias` of `name` (of all aliases when None), oldest first."""
    check_name(name)
    if alias is not None:
        check_alias(alias)
    client = mlflow_client()
    read_model(client, name)
    records = _read(client, name, alias)[0]  # one alias: in claim order
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
    setter = next((r for r in reversed(_read(client, name, alias)[0]) if r.completed and r.to_version == current), None)
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
    """Where a version came from and where it went, as data for the CLI to format: `registry.version_facts`
    plus `moves` (every history entry to or from this version)."""
    facts = version_facts(name, ref)
    version = facts["version"]["version"]
    return facts | {"moves": [asdict(r) for r in history(name) if version in (r.from_version, r.to_version)]}


def migrate_history(name: str) -> int:
    """Move the completed history entries an older vitops kept as registered models (`NAME.history.ALIAS.N`)
    into the ledger, then delete those registered models, so the model list shows real models only.

    Each entry is deleted only once its copy is read back from the ledger; an uncompleted entry stays (the next
    move of its alias rolls it forward). Run it once every mover runs this vitops.

    Returns:
        How many entries moved.
    """
    check_name(name)
    client = mlflow_client()
    read_model(client, name)
    with server_errors(f"moving the alias history of {name} into {LEDGER}"):
        in_ledger = {(r.alias, r.seq) for r in _ledger(client, name, None)}
        old = [r for r in _legacy(client, name, None) if r.completed]
        for record in old:
            if (record.alias, record.seq) not in in_ledger:
                _log_move(client, record)
        in_ledger = {(r.alias, r.seq) for r in _ledger(client, name, None)}
        moved = [r for r in old if (r.alias, r.seq) in in_ledger]
        for record in moved:
            client.delete_registered_model(_legacy_name(record))
    log.info("%s: moved %d alias history entries into the experiment %s", name, len(moved), LEDGER)
    return len(moved)


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
    entries, claims = _read(client, name, alias)  # (1) the history, then (2) the alias: this order matters
    current = alias_holder(client, name, alias)
    last = entries[-1] if entries else None
    completed = ""  # a crashed mover's move this call completed, said in its record and in any refusal
    if last is not None and not last.completed:  # (3)
        age = _age_s(last.time)
        if age < GRACE_S:
            raise MoveConflict(
                f"a move of {alias} of {name} is in progress (entry {last.seq}: {_v(last.from_version)} -> "
                f"{_v(last.to_version)} by {last.user}@{last.host}, {age:.0f} s ago); nothing moved. Retry once it "
                f"completes (an abandoned move is rolled forward after {GRACE_S:.0f} s)"
            )
        _apply(client, last, claims.pop((alias, last.seq), None))
        completed = (
            f"completed move {last.seq}: {_v(last.from_version)} -> {_v(last.to_version)} left by a crashed mover "
            f"({last.user}@{last.host}, {age:.0f} s ago)"
        )
        log.warning("%s of %s: %s", alias, name, completed)
        note = "; ".join(filter(None, [note, completed]))
        current = alias_holder(client, name, alias)
    for claim_id in claims.values():  # the ledger has them: their movers died before dropping the claim
        delete_experiment(client, claim_id)
    done = f"{completed}; then " if completed else ""
    if expect is not None and expect != _v(current):  # (4)
        raise MoveConflict(
            f"{done}{alias} of {name} points at {current or 'nothing'}, not {expect} as expected; nothing moved. "
            f"Check the history, then retry expecting {_v(current)} if the move is still wanted"
        )
    if version == current:
        raise RegistryError(f"{done}{alias} of {name} already points at {current or 'nothing'}; nothing to move")
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
        user=who(),
        host=socket.gethostname(),
        flow_run_id=flow_run_id,
        reason=reason,
        approval=approval,
        override=override,
        completed=False,
        note=note,
    )
    entry = _claim_name(record)
    claim = uuid.uuid4().hex  # tells our own claim, seen again after a retried request, from a rival's
    with server_errors(f"claiming history entry {entry}"):  # (5) one creator of this name succeeds
        claim_id = create_experiment(client, entry, tags=_tags(record) | {"claim": claim})
        if claim_id is None:
            found = client.get_experiment_by_name(entry)
            if found is None or found.tags.get("claim") != claim:
                raise MoveConflict(
                    f"another move of {alias} of {name} won the race: entry {record.seq} ({entry}) exists; "
                    "nothing moved. Check the history and retry"
                )
            claim_id = found.experiment_id
    _apply(client, record, claim_id)  # (6)
    log.info("%s of %s: %s -> %s (entry %d)", alias, name, _v(current), _v(version), record.seq)
    return record


def _apply(client: Any, record: MoveRecord, claim_id: str | None) -> None:
    """Set or remove the alias of a claimed entry, log it in the ledger, then drop the claim (an entry of an older
    vitops, which has no claim, is marked completed where it is)."""
    with server_errors(f"moving {record.alias} of {record.model} to {_v(record.to_version)}"):
        if record.to_version is None:
            client.delete_registered_model_alias(record.model, record.alias)  # no error when already unset
        else:
            client.set_registered_model_alias(record.model, record.alias, record.to_version)
        record.completed = True
        _log_move(client, record)
        if claim_id is not None:
            delete_experiment(client, claim_id)
        elif lookup(client.get_registered_model, _legacy_name(record)) is not None:
            client.set_registered_model_tag(_legacy_name(record), "completed", "true")
        show_aliases(client, record.model, ALIASES_TAG)


def _log_move(client: Any, record: MoveRecord) -> None:
    """One run in the ledger experiment: the move's tags, its reason as the run's description."""
    ledger_id = ensure_experiment(client, LEDGER, "Alias moves of the registered models, one run per move.")
    approval = f"; approved by {record.approval.get('approver', '?')}" if record.approval else ""
    text = f"**{record.alias}** of `{record.model}`: {_v(record.from_version)} → {_v(record.to_version)}{approval}"
    note = "\n\n".join(filter(None, [text, f"Reason: {record.reason}", record.note]))
    tags = _tags(record) | {"seq": str(record.seq), "mlflow.user": record.user, "mlflow.note.content": note}
    run_name = f"{record.model} {record.alias} {_v(record.from_version)}->{_v(record.to_version)}"
    start = int(datetime.fromisoformat(record.time).timestamp() * 1000) if record.time[:1].isdigit() else None
    run = client.create_run(ledger_id, start_time=start, tags=tags, run_name=run_name)
    client.set_terminated(run.info.run_id, "FINISHED")


def _read(client: Any, name: str, alias: str | None) -> tuple[list[MoveRecord], dict[tuple[str, int], str]]:
    """The history of (name, alias), and the open claims' experiment ids by (alias, seq).

    Claims first: a move that completes while we read shows in the ledger, or its claim is still seen. One entry
    per (alias, seq): the ledger's, else the open claim's, else an older vitops's registered model.
    """
    prefix = f"{CLAIM_PREFIX}/{name}/{alias}/" if alias else f"{CLAIM_PREFIX}/{name}/"
    found: dict[tuple[str, int], MoveRecord] = {}
    claims: dict[tuple[str, int], str] = {}
    with server_errors(f"reading the alias history of {name}"):
        open_claims = all_pages(client.search_experiments, filter_string=f"name LIKE '{prefix}%'")  # active only
        for exp in open_claims:
            match = _CLAIM_NAME.fullmatch(exp.name)  # LIKE reads `_` as a wildcard: keep exact matches
            if match and match["model"] == name and exp.tags.get(HISTORY_TAG) == "true":
                record = _record(name, match["alias"], int(match["seq"]), exp.tags)
                found[(record.alias, record.seq)] = record
                claims[(record.alias, record.seq)] = exp.experiment_id
        for record in _ledger(client, name, alias):
            found[(record.alias, record.seq)] = record
        for record in _legacy(client, name, alias):
            found.setdefault((record.alias, record.seq), record)
    return sorted(found.values(), key=lambda r: (r.alias, r.seq)), claims


def _ledger(client: Any, name: str, alias: str | None) -> list[MoveRecord]:
    """The ledger's runs of `name`, deleted ones too."""
    from mlflow.entities import ViewType

    ledger = client.get_experiment_by_name(LEDGER)
    if ledger is None:
        return []
    query = f"tags.model = '{name}' AND tags.`{HISTORY_TAG}` = 'true'"
    query += f" AND tags.alias = '{alias}'" if alias else ""
    ids = [ledger.experiment_id]
    found = all_pages(client.search_runs, experiment_ids=ids, filter_string=query, run_view_type=ViewType.ALL)
    runs = {(r.data.tags["alias"], r.data.tags["seq"]): r for r in found}  # two movers may roll one forward
    return [_record(name, a, int(seq), r.data.tags) for (a, seq), r in runs.items()]


def _legacy(client: Any, name: str, alias: str | None) -> list[MoveRecord]:
    """The entries an older vitops kept as registered models named `NAME.history.ALIAS.N`."""
    prefix = f"{name}.history.{alias}." if alias else f"{name}.history."
    records = []
    for rm in all_pages(client.search_registered_models, filter_string=f"name LIKE '{prefix}%'"):
        match = _HISTORY_NAME.fullmatch(rm.name)  # LIKE reads `_` as a wildcard (and ignores case on SQLite)
        if match and match["model"] == name and rm.tags.get(HISTORY_TAG) == "true":
            records.append(_record(name, match["alias"], int(match["seq"]), rm.tags))
    return records


def _claim_name(record: MoveRecord) -> str:
    return f"{CLAIM_PREFIX}/{record.model}/{record.alias}/{record.seq:06d}"


def _legacy_name(record: MoveRecord) -> str:
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


def _record(model: str, alias: str, seq: int, tags: dict[str, str]) -> MoveRecord:
    text = {key: tags.get(key, "") for key in ("time", "user", "host", "flow_run_id", "reason", "note")}
    versions = {key: None if tags.get(key, "none") == "none" else tags[key] for key in ("from_version", "to_version")}
    return MoveRecord(
        seq=seq,
        model=model,
        alias=alias,
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
