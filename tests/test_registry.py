"""The registry against a real MLflow server: registration with its serving artifacts, gated and checked alias
moves, a race of two promoter processes, a mover killed mid-move, the claim's atomicity (experiment names, deleted
ones included, from two processes), rollback, the history seen from another process, stale claims, the history an
older vitops kept as registered models (read, rolled forward, migrated), and refused input that leaves the
registry exactly as it was."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.registry import Release, build_release, new_run, register, unique
from helpers.servers import forget_tracking_uri
from mlflow import MlflowClient

from vitops.flows import aliases, packaging, registry
from vitops.flows.aliases import CLAIM_PREFIX, LEDGER, MoveConflict
from vitops.flows.registry import RegistryError

pytestmark = pytest.mark.integration


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state(name: str) -> dict[str, Any]:
    """Everything the registry holds for `name`: registered models under that prefix, versions, aliases."""
    client = MlflowClient()
    models = sorted(m.name for m in client.search_registered_models(f"name LIKE '{name}%'", max_results=1000))
    versions = sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) if name in models else []
    aliases = client.get_registered_model(name).aliases if name in models else {}
    return {"models": models, "versions": versions, "aliases": aliases}


def champion(name: str) -> str | None:
    return MlflowClient().get_registered_model(name).aliases.get("champion")


def _three_versions_v1_champion(prefix: str, release: Release, reason: str) -> tuple[str, str, str, str]:
    """A new model with three versions, the first of them champion through a recorded move."""
    name = unique(prefix)
    v1, v2, v3 = (register(name, release) for _ in range(3))
    aliases.move_alias(name, "champion", v1, expect="none", reason=reason)
    return name, v1, v2, v3


def open_claims(name: str) -> list[str]:
    """Claims of `name` still in the experiment list (active experiments)."""
    return [e.name for e in MlflowClient().search_experiments(filter_string=f"name LIKE '{CLAIM_PREFIX}/{name}/%'")]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return build_release(tmp_path_factory.mktemp("release"))


def test_registered_version_carries_tags_artifacts_and_lineage(server: str, release: Release) -> None:
    name = unique("reg")
    version = register(name, release, data_version="abc123", git_commit="deadbeef", train_run_id="")
    info = registry.version_info(name, version)
    assert info.version == version == "1" and info.source.endswith("/pyfunc")
    assert info.tags["data_version"] == "abc123" and info.tags["gate.passed"] == "true"
    files = {a.path for a in MlflowClient().list_artifacts(info.run_id, "pyfunc/artifacts")}
    assert {"pyfunc/artifacts/model", "pyfunc/artifacts/engines", "pyfunc/artifacts/serving.json"} <= files
    assert "pyfunc/artifacts/model.onnx" in files
    assert {a.path for a in MlflowClient().list_artifacts(info.run_id, "pyfunc")} >= {"pyfunc/MLmodel", "pyfunc/code"}

    aliases.move_alias(name, "candidate", version, expect=None, reason="passed the KPI gate")
    facts = aliases.lineage(name, "candidate")
    assert facts["version"]["aliases"] == ["candidate"] and facts["gate"]["passed"] == "true"
    assert facts["run"]["tags"]["purpose"] == "test" and facts["train_run"] is None
    (engine,) = facts["engines"]
    assert engine["file"] == "onnxruntime/fp32.onnx" and engine["sha256"] == sha256(release.engines[0])
    assert engine["meta"]["target"] == "onnxruntime" and engine["threads"] == 1
    assert facts["serving"]["onnx"]["sha256"] == sha256(release.onnx)
    assert [(m["alias"], m["to_version"]) for m in facts["moves"]] == [("candidate", "1")]
    assert not aliases.is_history_model(name) and aliases.is_history_model(f"{name}.history.candidate.000001")


def test_moves_leave_the_model_and_experiment_lists_clean(server: str, release: Release) -> None:
    name = unique("lists")
    v1, v2 = register(name, release), register(name, release)
    aliases.move_alias(name, "candidate", v2, expect=None, reason="passed the KPI gate")
    aliases.move_alias(name, "pilot", v1, expect="none", reason="shadow first")
    aliases.move_alias(name, "champion", v1, expect="none", reason="approved", approval={"approver": "ann"})
    client = MlflowClient()
    assert state(name)["models"] == [name] and open_claims(name) == []  # no history rows, no claims left
    claim = client.get_experiment_by_name(f"{CLAIM_PREFIX}/{name}/champion/000001")
    assert claim.lifecycle_stage == "deleted" and claim.tags["to_version"] == v1  # the reserved name
    ledger = client.get_experiment_by_name(LEDGER)
    runs = client.search_runs([ledger.experiment_id], f"tags.model = '{name}'", order_by=["attributes.start_time"])
    assert [(r.data.tags["alias"], r.data.tags["to_version"]) for r in runs] == [
        ("candidate", v2), ("pilot", v1), ("champion", v1),
    ]  # fmt: skip
    champ = runs[-1]
    assert champ.info.status == "FINISHED" and champ.data.tags["mlflow.user"] == champ.data.tags["user"]
    assert "approved by ann" in champ.data.tags["mlflow.note.content"]
    assert client.get_registered_model(name).tags["vitops.aliases"] == f"champion v{v1} · pilot v{v1} · candidate v{v2}"


def test_failed_gate_is_refused_unless_overridden_with_a_reason(server: str, release: Release) -> None:
    name = unique("gate")
    version = register(name, release, passed=False)
    with pytest.raises(RegistryError, match=r"did not pass the gate \(gate.passed=false; reasons: top1 0.50 < 0.90\)"):
        aliases.move_alias(name, "champion", version, expect="none", reason="ship it")
    with pytest.raises(RegistryError, match="needs a reason"):
        aliases.move_alias(name, "champion", version, expect="none", reason=" ", override_gate=True)
    assert aliases.history(name) == [] and champion(name) is None

    approval = {"by": "alice", "comment": "accepted for the pilot week"}
    record = aliases.move_alias(
        name, "champion", version, expect="none", reason="known data shift", approval=approval, override_gate=True
    )
    assert record.override and record.completed and champion(name) == version
    (entry,) = aliases.history(name, "champion")
    assert entry.override and entry.reason == "known data shift" and entry.approval == approval
    assert entry.from_version is None and entry.to_version == version


def test_expect_mismatch_is_refused_and_leaves_the_alias(server: str, release: Release) -> None:
    name = unique("expect")
    v1, v2 = register(name, release), register(name, release)
    aliases.move_alias(name, "champion", v1, expect="none", reason="first")
    with pytest.raises(MoveConflict, match=f"champion of {name} points at {v1}, not {v2} as expected"):
        aliases.move_alias(name, "champion", v2, expect=v2, reason="wrong expectation")
    with pytest.raises(MoveConflict, match="points at 1, not none"):
        aliases.move_alias(name, "champion", v2, expect="none", reason="thought it unset")
    assert champion(name) == v1 and len(aliases.history(name, "champion")) == 1


RACER = """
import sys, time
from pathlib import Path
from vitops.flows.aliases import MoveConflict, move_alias
go, ready, name, version, expect = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
try:
    record = move_alias(name, "champion", version, expect=expect, reason="race " + version)
except MoveConflict as err:
    print(err)
    sys.exit(3)
print("won entry", record.seq)
"""


CREATOR = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
go, ready, name = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
try:
    MlflowClient().create_experiment(name)
except MlflowException as err:
    print(err.error_code)
    sys.exit(3)
print("created")
"""


def _race(script: str, tmp_path: Path, runs: dict[str, list[str]]) -> dict[str, tuple[int, str]]:
    """Start one process per key with `script GO READY *args`, release them together, return (code, output)."""
    go = tmp_path / "go"
    procs = {
        key: subprocess.Popen([sys.executable, "-c", script, str(go), str(tmp_path / f"ready-{key}"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for key, args in runs.items()
    }  # fmt: skip
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{key}").exists() for key in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # all are polling: released within milliseconds of each other
    return {key: (p.wait(timeout=120), p.stdout.read()) for key, p in procs.items()}  # type: ignore[union-attr]


def test_two_racing_promoters_exactly_one_wins(server: str, release: Release, tmp_path: Path) -> None:
    name, v1, v2, v3 = _three_versions_v1_champion("race", release, reason="start")
    results = _race(RACER, tmp_path, {v: [name, v, v1] for v in (v2, v3)})
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 3], results
    winner = next(v for v, (code, _) in results.items() if code == 0)
    loser_message = next(out for code, out in results.values() if code == 3)
    assert "won the race" in loser_message or "in progress" in loser_message or "not 1 as expected" in loser_message
    entries = aliases.history(name, "champion")
    assert [(e.seq, e.from_version, e.to_version) for e in entries] == [(1, None, v1), (2, v1, winner)]
    assert all(e.completed for e in entries) and champion(name) == winner


def test_experiment_names_are_claimed_once_deleted_ones_included(server: str, tmp_path: Path) -> None:
    # The claim's atomicity, from two processes against the real server (SQLite-backed SQL store).
    fresh, deleted = unique("claim-fresh"), unique("claim-deleted")
    client = MlflowClient()
    client.delete_experiment(client.create_experiment(deleted))
    for folder in ("fresh", "deleted"):
        (tmp_path / folder).mkdir()
    first = _race(CREATOR, tmp_path / "fresh", {k: [fresh] for k in "ab"})
    assert sorted(code for code, _ in first.values()) == [0, 3], first
    assert "RESOURCE_ALREADY_EXISTS" in next(out for code, out in first.values() if code == 3)
    again = _race(CREATOR, tmp_path / "deleted", {k: [deleted] for k in "ab"})
    assert [code for code, _ in again.values()] == [3, 3], again  # a soft-deleted name stays reserved
    assert all("RESOURCE_ALREADY_EXISTS" in out for _, out in again.values())
    assert client.get_experiment_by_name(deleted).lifecycle_stage == "deleted"


KILLED = """
import os, signal, sys
from vitops.flows import aliases
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # after the claim, before the alias is set
aliases._apply = die
aliases.move_alias(sys.argv[1], "champion", sys.argv[2], expect=sys.argv[3], reason="killed mid-move")
"""


def test_a_mover_killed_mid_move_blocks_then_is_rolled_forward(
    server: str, release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, v1, v2, v3 = _three_versions_v1_champion("killed", release, reason="first")
    proc = subprocess.run([sys.executable, "-c", KILLED, name, v2, v1], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert champion(name) == v1 and open_claims(name) == [f"{CLAIM_PREFIX}/{name}/champion/000002"]
    with pytest.raises(MoveConflict, match="a move of champion .* is in progress .*entry 2: 1 -> 2"):
        aliases.move_alias(name, "champion", v3, expect=v1, reason="too early")
    monkeypatch.setattr(aliases, "GRACE_S", 0.0)  # the claim is now abandoned: rolled forward, then this move
    record = aliases.move_alias(name, "champion", v3, expect=v2, reason="after the crash")
    entries = aliases.history(name, "champion")
    assert [(e.seq, e.to_version, e.completed) for e in entries] == [(1, v1, True), (2, v2, True), (3, v3, True)]
    assert record.from_version == v2 and champion(name) == v3 and open_claims(name) == []
    assert state(name)["models"] == [name]


class _CompetitorBeforeClaim:
    """An MlflowClient that lets a competing mover complete between this mover's reads and its claim."""

    def __init__(self, competitor: Any) -> None:
        self._inner, self._competitor = MlflowClient(), competitor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_experiment(self, name: str, **kwargs: Any) -> Any:
        if name.startswith(CLAIM_PREFIX) and self._competitor is not None:
            self._competitor, competitor = None, self._competitor
            competitor()
        return self._inner.create_experiment(name, **kwargs)


def test_a_mover_that_read_before_the_winner_claimed_loses_the_claim(
    server: str, release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subprocess race above mostly ends with the loser reading after the winner's claim; this pins down the
    # other interleaving: both read the same history, the winner claims first, the loser's claim is refused.
    name, v1, v2, v3 = _three_versions_v1_champion("claim", release, reason="start")
    clients = iter([_CompetitorBeforeClaim(lambda: aliases.move_alias(name, "champion", v3, expect=v1, reason="A"))])
    monkeypatch.setattr(aliases, "mlflow_client", lambda: next(clients, None) or MlflowClient())
    with pytest.raises(MoveConflict, match=f"another move of champion of {name} won the race: entry 2"):
        aliases.move_alias(name, "champion", v2, expect=v1, reason="B")
    entries = aliases.history(name, "champion")
    assert [(e.seq, e.to_version, e.reason) for e in entries] == [(1, v1, "start"), (2, v3, "A")]
    assert champion(name) == v3


def test_rollback_restores_the_previous_holder_and_is_recorded(server: str, release: Release) -> None:
    name = unique("rollback")
    v1, v2 = register(name, release), register(name, release)
    aliases.move_alias(name, "champion", v1, expect="none", reason="first")
    with pytest.raises(RegistryError, match="no earlier holder"):
        aliases.rollback(name, reason="nothing before v1")
    aliases.move_alias(name, "champion", v2, expect=v1, reason="better top-1", flow_run_id="flow-42")
    record = aliases.rollback(name, reason="latency regression", flow_run_id="flow-43")
    assert (record.from_version, record.to_version, record.seq) == (v2, v1, 3) and champion(name) == v1
    last = aliases.history(name, "champion")[-1]
    assert last.reason == "latency regression" and last.flow_run_id == "flow-43" and "rollback" in last.note


def test_history_from_another_process_equals_this_one(server: str, release: Release) -> None:
    name = unique("hist")
    v1, v2 = register(name, release), register(name, release)
    aliases.move_alias(name, "candidate", v1, expect=None, reason="gate passed")
    aliases.move_alias(name, "champion", v1, expect="none", reason="approved", approval={"by": "bob"})
    aliases.move_alias(name, "candidate", v2, expect=v1, reason="gate passed")
    aliases.move_alias(name, "candidate", None, expect=v2, reason="withdrawn")
    here = [asdict(r) for r in aliases.history(name)]
    code = "import json, sys; from dataclasses import asdict; from vitops.flows.aliases import history; "
    code += "print(json.dumps([asdict(r) for r in history(sys.argv[1])]))"
    out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == here
    assert [(r["alias"], r["from_version"], r["to_version"]) for r in here] == [
        ("candidate", None, v1),
        ("champion", None, v1),
        ("candidate", v1, v2),
        ("candidate", v2, None),
    ]
    assert "candidate" not in MlflowClient().get_registered_model(name).aliases


def test_bad_requests_are_clear_errors_and_change_nothing(server: str, release: Release, tmp_path: Path) -> None:
    name = unique("bad")
    v1 = register(name, release)
    aliases.move_alias(name, "champion", v1, expect="none", reason="first")
    before = state(name)
    with pytest.raises(RegistryError, match=f"no registered model 'no-such-model' at {server}"):
        aliases.move_alias("no-such-model", "champion", "1", expect=None, reason="x")
    with pytest.raises(RegistryError, match=f"{name} has no version 99 at {server}"):
        aliases.move_alias(name, "pilot", "99", expect=None, reason="x")
    for reserved in ("latest", "v1"):
        with pytest.raises(RegistryError, match=r"MLflow itself reserves 'latest'.*candidate, pilot, champion"):
            aliases.move_alias(name, reserved, v1, expect=None, reason="x")
    with pytest.raises(RegistryError, match="not allowed; vitops uses candidate, pilot, champion"):
        aliases.move_alias(name, "production", v1, expect=None, reason="x")
    with pytest.raises(RegistryError, match="no earlier holder"):
        aliases.rollback(name, reason="x")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_bytes((release.model_dir / "model.json").read_bytes())
    with pytest.raises(RegistryError, match="missing weights.safetensors"):
        packaging.register_version(name, new_run(), broken, release.onnx, release.engines, release.serving, {})
    new_name = unique("never")
    with pytest.raises(RegistryError, match="missing weights.safetensors"):
        packaging.register_version(new_name, new_run(), broken, release.onnx, release.engines, release.serving, {})
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(release.engines[0].read_bytes())
    with pytest.raises(RegistryError, match="lone.onnx: engine file or its metadata lone.onnx.json is missing"):
        packaging.register_version(name, new_run(), release.model_dir, release.onnx, [lone], {}, {})
    with pytest.raises(RegistryError, match=r"serving entries \['tensorrt/fp16.plan'\] match none"):
        serving = {"engines": [{"file": "tensorrt/fp16.plan", "target": "tensorrt", "p50_ms": 0.1}]}
        packaging.register_version(name, new_run(), release.model_dir, release.onnx, release.engines, serving, {})
    assert state(name) == before and state(new_name)["models"] == []


def test_unreachable_server_names_its_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    forget_tracking_uri(monkeypatch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(RegistryError, match=f"MLflow at http://127.0.0.1:{port}: reading registered model m failed"):
        aliases.history("m")


def _plant(name: str, seq: int, from_version: str, to_version: str, age: timedelta, completed: bool = False) -> None:
    """A history entry as an older vitops kept it, a registered model; uncompleted, as its mover left it between
    its claim and its alias set."""
    tags = {
        "vitops.history": "true",
        "model": name,
        "alias": "champion",
        "from_version": from_version,
        "to_version": to_version,
        "time": (datetime.now(UTC) - age).isoformat(),
        "user": "crashed",
        "host": "elsewhere",
        "flow_run_id": "",
        "reason": "promotion that died",
        "approval": "",
        "override": "false",
        "completed": str(completed).lower(),
    }
    MlflowClient().create_registered_model(f"{name}.history.champion.{seq:06d}", tags=tags)


def test_an_older_vitops_claims_in_progress_block_and_stale_ones_are_rolled_forward(
    server: str, release: Release, caplog: pytest.LogCaptureFixture
) -> None:
    name, v1, v2, v3 = _three_versions_v1_champion("stale", release, reason="first")
    _plant(name, 2, v1, v2, age=timedelta(seconds=5))
    with pytest.raises(MoveConflict, match="a move of champion .* is in progress .*crashed@elsewhere"):
        aliases.move_alias(name, "champion", v3, expect=v1, reason="too early")
    assert champion(name) == v1 and len(aliases.history(name, "champion")) == 2

    MlflowClient().delete_registered_model(f"{name}.history.champion.000002")
    _plant(name, 2, v1, v2, age=timedelta(minutes=10))
    done = f"completed move 2: {v1} -> {v2} left by a crashed mover \\(crashed@elsewhere"
    with caplog.at_level(logging.WARNING, logger="vitops.flows.aliases"):  # its own move refused for its own reason
        with pytest.raises(MoveConflict, match=rf"{done}.*; then champion of {name} points at {v2}, not {v1}"):
            aliases.move_alias(name, "champion", v3, expect=v1, reason="expecting what it saw before the crash")
    assert f"completed move 2: {v1} -> {v2}" in caplog.text and champion(name) == v2
    entries = aliases.history(name, "champion")
    assert [(e.seq, e.to_version, e.completed) for e in entries] == [(1, v1, True), (2, v2, True)]

    MlflowClient().delete_registered_model(f"{name}.history.champion.000002")  # the ledger has it now
    _plant(name, 3, v2, v1, age=timedelta(minutes=10))
    record = aliases.move_alias(name, "champion", v3, expect=v1, reason="after the crash")  # done in the same call
    assert record.from_version == v1 and champion(name) == v3
    assert record.note.startswith(f"completed move 3: {v2} -> {v1} left by a crashed mover")
    entries = aliases.history(name, "champion")
    assert [(e.seq, e.to_version, e.completed) for e in entries][2:] == [(3, v1, True), (4, v3, True)]


def test_alias_moved_outside_vitops_is_reported(server: str, release: Release) -> None:
    name, v1, v2, v3 = _three_versions_v1_champion("outside", release, reason="first")
    MlflowClient().set_registered_model_alias(name, "champion", v2)  # someone used the MLflow UI
    record = aliases.move_alias(name, "champion", v3, expect=v2, reason="next")
    assert record.from_version == v2 and "moved outside vitops: history said 1, registry had 2" in record.note
    assert aliases.history(name, "champion")[-1].note == record.note


def test_the_history_an_older_vitops_kept_is_read_then_migrated_without_loss(
    server: str, release: Release, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("legacy")
    v1, v2, v3 = (register(name, release) for _ in range(3))
    MlflowClient().set_registered_model_alias(name, "champion", v2)  # as the older vitops left it
    _plant(name, 1, "none", v1, age=timedelta(days=2), completed=True)
    _plant(name, 2, v1, v2, age=timedelta(days=1), completed=True)
    before = [asdict(r) for r in aliases.history(name)]
    assert [(r["seq"], r["to_version"]) for r in before] == [(1, v1), (2, v2)]
    assert aliases.migrate_history(name) == 2
    assert [asdict(r) for r in aliases.history(name)] == before and state(name)["models"] == [name]
    from vitops.flows.cli import main

    assert main(["history", name, "--migrate"]) == 0  # nothing left to move; prints the history
    assert f"{name}: moved 0 history entries" in capsys.readouterr().err
    record = aliases.move_alias(name, "champion", v3, expect=v2, reason="after the upgrade")
    assert record.seq == 3 and record.from_version == v2 and champion(name) == v3
    assert aliases.rollback(name, reason="back").to_version == v2
