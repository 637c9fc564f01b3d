"""The staged pilot against a real `prefect server start` and a real `mlflow server` on 127.0.0.1, run the way a
user runs it: `vitops pilot STAGE` processes talking to both servers, and `vitops approve` resuming a paused
promotion through the Prefect API.

Versions of one registered model: v1 the champion, v2 a candidate with the champion's weights (it agrees with
it everywhere), v3 a candidate with other weights (it agrees on about a third). The batch's labelled half is
labelled with the champion's own answers, so the champion is right on all of it and v3 is far worse."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from helpers.registry import Release, build_release, register, unique
from helpers.servers import forget_tracking_uri
from mlflow import MlflowClient
from PIL import Image

from vitops.flows import aliases

pytestmark = pytest.mark.integration
IMAGES = 40


@contextmanager
def _at(server: str) -> Iterator[None]:
    """This process's MLflow calls go to `server` inside the block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server)
        forget_tracking_uri(mp)
        yield


@pytest.fixture(scope="module")
def pilot_env(tmp_path_factory: pytest.TempPathFactory, prefect_server: str, mlflow_server: str) -> dict[str, Any]:
    """Three registered versions, the champion set, a batch labelled by the champion, and a params file."""
    root = tmp_path_factory.mktemp("pilot")
    good: Release = build_release(root / "good", seed=0)
    bad: Release = build_release(root / "bad", seed=7)
    name = unique("pilot-digits")
    with _at(mlflow_server):
        v1, v2, v3 = register(name, good), register(name, good), register(name, bad)
        aliases.move_alias(name, "champion", v1, expect="none", reason="first champion")
        champion = mlflow.pyfunc.load_model(f"models:/{name}/{v1}")
        batch = _write_batch(root / "batch", champion)
    project = root / "project"
    project.mkdir()
    params = _params(project / "params.yaml", name, batch, approval_timeout_s=120)
    env = os.environ | {"PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server}
    return {"name": name, "v": (v1, v2, v3), "batch": batch, "params": params, "project": project, "env": env,
            "server": mlflow_server}  # fmt: skip


def _params(path: Path, name: str, batch: Path, **pilot: Any) -> Path:
    text = {
        "tracking": {"registered_model": name, "experiment": "pilot-tests"},
        "validate": {"min_width": 8, "min_height": 8},
        "pilot": {"batch": str(batch), "out_dir": str(path.parent / "artifacts" / path.stem), "canary_fraction": 0.5,
                  "min_labelled": 5, "approval_poll_s": 1, **pilot},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(text), encoding="utf-8")
    return path


def _write_batch(root: Path, champion: Any) -> Path:
    """Noise images, half of them in class folders labelled with the champion's answer, plus two broken files."""
    rng = np.random.default_rng(3)
    loose = root / "unlabelled"
    loose.mkdir(parents=True)
    paths = []
    for i in range(IMAGES):
        path = loose / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    labels = champion.predict(np.array([str(p) for p in paths], dtype=object))["label"].tolist()
    for path, label in list(zip(paths, labels, strict=True))[::2]:  # every other one gets its label folder
        (root / label).mkdir(exist_ok=True)
        path.rename(root / label / path.name)
    (root / "truncated.png").write_bytes(paths[1].read_bytes()[:60])
    (root / "notes.png").write_text("not an image", encoding="utf-8")
    return root


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _vitops(env: dict[str, Any], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vitops", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _pilot(e: dict[str, Any], stage: str, *args: str, params: Path | None = None) -> subprocess.CompletedProcess:
    return _vitops(e["env"], e["project"], "--params", str(params or e["params"]), "pilot", stage, *args)


def _aliases(e: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient(e["server"]).get_registered_model(e["name"]).aliases.items()}


def _tags(e: dict[str, Any], version: str) -> dict[str, str]:
    return dict(MlflowClient(e["server"]).get_model_version(e["name"], version).tags)


def _api(env: dict[str, Any], path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def _paused_run(env: dict[str, Any], params: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The id of the paused promote run of this params file (the run waits for its approval)."""
    deadline = time.monotonic() + timeout
    body = {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "sort": "START_TIME_DESC", "limit": 20}
    while time.monotonic() < deadline:
        for run in _api(env, "/flow_runs/filter", body):
            if run["parameters"].get("params_file") == str(params):
                return run["id"]
        if proc.poll() is not None:
            raise AssertionError(f"promote ended before pausing: {proc.stdout.read()}")  # type: ignore[union-attr]
        time.sleep(1)
    raise AssertionError("promote never paused for an approval")


def _start_promote(e: dict[str, Any], params: Path, version: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vitops", "--params", str(params), "pilot", "promote", "--version", version]
    return subprocess.Popen(cmd, cwd=e["project"], env=e["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def _history(e: dict[str, Any], alias: str) -> list[Any]:
    with _at(e["server"]):
        return aliases.history(e["name"], alias)


def test_shadow_then_canary_are_recorded_and_broken_files_are_skipped(pilot_env: dict[str, Any]) -> None:
    e = pilot_env
    v1, v2, _ = e["v"]
    before = _snapshot(e["batch"])
    shadow = _pilot(e, "shadow", "--version", v2)
    assert shadow.returncode == 0, shadow.stdout + shadow.stderr
    assert "agreement 100.00 %" in shadow.stdout and f"alias pilot -> version {v2}" in shadow.stdout
    assert _aliases(e) == {"champion": v1, "pilot": v2}
    assert _snapshot(e["batch"]) == before  # no file of the batch changed, moved or added
    out = e["project"] / "artifacts" / "params" / "shadow"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "truncated.png" in report and "notes.png" in report  # listed as rejected ...
    scored = (out / "predictions.csv").read_text(encoding="utf-8")
    assert "truncated.png" not in scored and "notes.png" not in scored  # ... and never scored
    assert scored.count("\n") == IMAGES + 1
    tags = _tags(e, v2)
    run = MlflowClient(e["server"]).get_run(tags["pilot.shadow.run_id"])
    assert run.data.tags["vitops.pilot.champion_version"] == v1
    assert run.data.tags["vitops.pilot.candidate_version"] == v2
    assert run.data.metrics["agreement"] == 1.0 and run.data.metrics["champion.top1"] == 1.0
    assert run.data.metrics["batch.rejected"] == 2 and run.data.metrics["candidate.p95_ms"] > 0
    artifacts = _api(e["env"], "/artifacts/filter", {"artifacts": {"key": {"like_": e["name"].lower()}}})
    assert {f"{e['name']}-pilot-shadow", f"{e['name']}-pilot-shadow-models"} <= {a["key"] for a in artifacts}

    canary = _pilot(e, "canary", "--version", v2)
    assert canary.returncode == 0, canary.stdout + canary.stderr
    assert "every guardrail held" in canary.stdout
    tags = _tags(e, v2)
    assert tags["pilot.canary.outcome"] == "passed"
    summary = json.loads((out.parent / "canary" / "summary.json").read_text(encoding="utf-8"))
    routed = summary["routed"]
    assert routed["candidate"] + routed["champion"] == IMAGES and 0 < routed["candidate"] < IMAGES
    assert _aliases(e) == {"champion": v1, "pilot": v2}


def test_canary_guardrail_breach_removes_pilot_and_leaves_the_champion(pilot_env: dict[str, Any]) -> None:
    e = pilot_env
    v1, v2, v3 = e["v"]
    breach = _pilot(e, "canary", "--version", v3, "--skip", "shadow", "--reason", "test of the guardrail")
    assert breach.returncode == 1, breach.stdout + breach.stderr
    assert "Guardrail breach" in breach.stdout and "over the limit of 2" in breach.stdout
    assert _aliases(e)["champion"] == v1
    assert _tags(e, v3)["pilot.canary.outcome"] == "breach"


def test_promote_refuses_a_version_without_a_shadow_record(pilot_env: dict[str, Any]) -> None:
    e = pilot_env
    v1 = e["v"][0]
    with _at(e["server"]):
        fresh = register(e["name"], build_release(e["project"] / "fresh", seed=0))
        failed = register(e["name"], build_release(e["project"] / "failed", seed=0), passed=False)
    ungated = _pilot(e, "shadow", "--version", failed)
    assert ungated.returncode == 1 and "did not pass its KPI gate" in ungated.stdout  # a pilot starts from a gated one
    moves = len(_history(e, "champion"))
    itself = _pilot(e, "shadow", "--version", v1)
    assert itself.returncode == 1 and "the champion already" in itself.stdout  # no pilot of the champion
    refused = _pilot(e, "promote", "--version", fresh)
    assert refused.returncode == 1 and "Refused" in refused.stdout and "no shadow record" in refused.stdout
    assert _aliases(e)["champion"] == v1 and len(_history(e, "champion")) == moves


def test_promote_rejected_then_timed_out_then_approved_then_rolled_back(pilot_env: dict[str, Any]) -> None:
    e = pilot_env
    v1, v2, _ = e["v"]
    # rejected: nothing moves, the decision is on the version
    proc = _start_promote(e, e["params"], v2)
    run_id = _paused_run(e["env"], e["params"], proc)
    no = _vitops(e["env"], e["project"], "approve", run_id, "--approver", "bob", "--reject", "--comment", "not yet")
    assert no.returncode == 0, no.stdout + no.stderr
    assert proc.wait(timeout=120) == 1 and "Rejected" in proc.stdout.read()  # type: ignore[union-attr]
    assert _aliases(e)["champion"] == v1
    tags = _tags(e, v2)
    assert tags["approval.decision"] == "rejected" and tags["approval.approver"] == "bob"
    assert tags["approval.flow_run_id"] == run_id

    # timed out: nothing moves, recorded
    short = _params(e["project"] / "short.yaml", e["name"], e["batch"], approval_timeout_s=3)
    timed = _pilot(e, "promote", "--version", v2, params=short)
    # Prefect's server ends an expired pause with its own words around the state's name
    assert timed.returncode == 1 and "approval timed out" in timed.stdout.lower(), timed.stdout + timed.stderr
    assert _aliases(e)["champion"] == v1 and _tags(e, v2)["approval.decision"] == "timeout"

    # approved: the approval lands on the version, then champion moves, checked against the one seen
    proc = _start_promote(e, e["params"], v2)
    run_id = _paused_run(e["env"], e["params"], proc)
    bad = _vitops(e["env"], e["project"], "approve", run_id, "--approver", "")
    assert bad.returncode == 2 and "approver" in bad.stderr  # refused, the run stays paused
    ok = _vitops(e["env"], e["project"], "approve", run_id, "--approver", "alice", "--comment", "canary clean")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    output = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.wait(timeout=120) == 0, output
    assert f"-> version {v2}" in output and "alice" in output
    assert _aliases(e) == {"champion": v2}  # pilot over
    tags = _tags(e, v2)
    assert tags["approval.decision"] == "approved" and tags["approval.comment"] == "canary clean"
    last = _history(e, "champion")[-1]
    assert last.to_version == v2 and last.from_version == v1 and last.approval["approver"] == "alice"
    assert last.approval["identity"] == "unauthenticated" and last.user.endswith("(unauthenticated)")
    assert last.flow_run_id == run_id
    again = _vitops(e["env"], e["project"], "approve", run_id, "--approver", "alice")
    assert again.returncode == 2 and "not paused" in again.stderr

    # rollback: the champion before comes back, recorded
    back = _pilot(e, "rollback", "--reason", "line 3 reports misreads")
    assert back.returncode == 0, back.stdout + back.stderr
    assert _aliases(e)["champion"] == v1
    last = _history(e, "champion")[-1]
    assert (last.from_version, last.to_version, last.reason) == (v2, v1, "line 3 reports misreads")


def test_a_batch_that_fails_its_gate_is_not_scored(pilot_env: dict[str, Any], tmp_path: Path) -> None:
    e = pilot_env
    junk = tmp_path / "junk"
    (junk / "unlabelled").mkdir(parents=True)
    for i in range(3):
        (junk / "unlabelled" / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    Image.new("RGB", (32, 32)).save(junk / "unlabelled" / "ok.png")
    before = _snapshot(junk)
    out = _pilot(e, "shadow", "--version", e["v"][1], "--batch", str(junk))
    assert out.returncode == 1 and "Batch rejected" in out.stdout and "rejected" in out.stdout
    assert _snapshot(junk) == before
