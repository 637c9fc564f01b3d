"""The staged pilot on live traffic (`vitops pilot shadow|canary --source log`), against a real `prefect server
start` and a real `mlflow server`: the evidence is a prediction log written here with `PredictionLog`, as the
endpoints write it, so no endpoint runs.

Versions of one registered model: v1 the champion, v2 and v3 candidates. The log says what each answered: v2 agrees
with the champion but on two shadowed images and is as right as it on the canary; v3 is wrong on every canary image
since ten minutes ago, and right on older images that `--since 10m` leaves out. Two quick tests call the stage
functions on a log alone: a shadow whose every attempt failed, and a canary that breaches on errors and latency."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers.pilot_runs import paused_run, start_promote, vitops
from helpers.registry import CLASSES, build_release, register, unique
from helpers.servers import forget_tracking_uri
from mlflow import MlflowClient
from PIL import Image

from vitops.deploy.guardrails import routes_to_candidate
from vitops.deploy.prediction_log import Feedback, Prediction, PredictionLog, keep_image, parse_time
from vitops.flows import aliases
from vitops.flows.config import PilotParams
from vitops.flows.pilot_batch import Versions
from vitops.flows.pilot_log import LogWindow, canary_from_log, shadow_from_log


@contextmanager
def _at(server: str) -> Iterator[None]:
    """This process's MLflow calls go to `server` inside the block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server)
        forget_tracking_uri(mp)
        yield


@pytest.fixture(scope="module")
def live_env(tmp_path_factory: pytest.TempPathFactory, prefect_server: str, mlflow_server: str) -> dict[str, Any]:
    """Three registered versions (the champion set) and a params file whose prediction log is empty."""
    root = tmp_path_factory.mktemp("pilot-log")
    release = build_release(root / "release", seed=0)  # the log says what each version answered, not the model
    name = unique("live-pilot")
    with _at(mlflow_server):
        v1, v2, v3 = (register(name, release) for _ in range(3))
        aliases.move_alias(name, "champion", v1, expect="none", reason="first champion")
    project = root / "project"
    project.mkdir()
    params = project / "live.yaml"
    text = {
        "tracking": {"registered_model": name, "experiment": "pilot-log-tests"},
        "pilot": {"out_dir": str(project / "artifacts"), "canary_fraction": 0.5, "min_labelled": 5,
                  "approval_poll_s": 1, "approval_timeout_s": 120},
        "prediction_log": {"dir": str(project / "log")},
    }  # fmt: skip
    params.write_text(yaml.safe_dump(text), encoding="utf-8")
    env = {"PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server}
    return {"name": name, "v": (v1, v2, v3), "params": params, "project": project, "log": project / "log",
            "env": os.environ | env, "server": mlflow_server}  # fmt: skip


def _pilot(e: dict[str, Any], stage: str, *args: str) -> Any:
    return vitops(e["env"], e["project"], "--params", str(e["params"]), "pilot", stage, *args)


def _aliases(e: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient(e["server"]).get_registered_model(e["name"]).aliases.items()}


def _tags(e: dict[str, Any], version: str) -> dict[str, str]:
    return dict(MlflowClient(e["server"]).get_model_version(e["name"], version).tags)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _answer(e: dict[str, Any], version: str, route: str, sha: str, label: str, t: float, **extra: Any) -> Prediction:
    fields = {"time": t, "request_id": uuid.uuid4().hex, "sha256": sha, "model": e["name"], "version": version,
              "engine": "onnxruntime-fp32", "label": label, "confidence": 0.9, "latency_ms": 20.0, "route": route,
              "station": "line-3"} | extra  # fmt: skip
    return Prediction(**fields)


def _write(e: dict[str, Any], records: list[Prediction], truth: dict[str, str] | None = None) -> None:
    """Append answers and operator feedback to the log, as the endpoint and `POST /feedback` do."""
    with PredictionLog(e["log"], flush_s=0.2) as plog:
        for record in records:
            plog.append(record)
        for sha, label in (truth or {}).items():
            plog.append_feedback(Feedback(time.time(), sha, label, "alice", "api", "line-3"))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.integration
def test_shadow_from_the_log_starts_the_stage_then_records_agreement(live_env: dict[str, Any]) -> None:
    e = live_env
    v1, v2, _ = e["v"]
    started = _pilot(e, "shadow", "--source", "log", "--version", v2)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "no shadow answer" in started.stdout and "run this stage again" in started.stdout
    assert _aliases(e) == {"champion": v1, "pilot": v2}  # endpoints serving the champion now shadow v2
    tags = _tags(e, v2)
    assert tags["pilot.stage"] == "shadow" and "pilot.canary_fraction" not in tags
    assert "pilot.shadow.run_id" not in tags  # nothing to judge yet: no shadow record for promote
    since = parse_time(tags["pilot.stage_since"])

    # the line: 20 requests the champion answered and v2 shadowed, two disagreements (one image kept); 10 labelled
    now, records, truth = time.time(), [], {}
    for i in range(20):
        sha, label = _sha(f"shadow-{i}"), CLASSES[i % 3]
        own = CLASSES[(i + 1) % 3] if i in (3, 7) else label
        kept = keep_image(e["log"], sha, _png(), ".png") if i == 3 else ""
        champion = _answer(e, v1, "champion", sha, label, now)
        records += [champion, _answer(e, v2, "shadow", sha, own, now, request_id=champion.request_id,
                                      champion_label=label, champion_confidence=0.8, image=kept)]  # fmt: skip
        if i < 10:
            truth[sha] = label  # the champion was right: v2 is wrong on 3 and 7
    # before the stage started: disagreements that must not count
    records += [
        _answer(e, v2, "shadow", _sha(f"old-{i}"), "nut", since - 3600, champion_label="bolt") for i in range(5)
    ]
    _write(e, records, truth)

    shadow = _pilot(e, "shadow", "--source", "log", "--version", v2)
    assert shadow.returncode == 0, shadow.stdout + shadow.stderr
    assert "agreement 90.00 %" in shadow.stdout, shadow.stdout
    tags = _tags(e, v2)
    assert tags["pilot.shadow.agreement"] == "0.900000" and tags["pilot.stage"] == "shadow"
    assert parse_time(tags["pilot.stage_since"]) == since  # the stage goes on: its window keeps its start
    run = MlflowClient(e["server"]).get_run(tags["pilot.shadow.run_id"])
    metrics = run.data.metrics
    assert metrics["agreement"] == 0.9 and metrics["disagreements"] == 2 and metrics["log.images"] == 20
    assert metrics["log.labelled"] == 10 and metrics["uplift_points"] == pytest.approx(-20.0)
    assert metrics["candidate.top1"] == 0.8 and metrics["champion.top1"] == 1.0
    out = e["project"] / "artifacts" / "shadow"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Disagreements (2)" in report and "disagreements.png" in report and (out / "disagreements.png").is_file()
    assert (out / "predictions.csv").read_text(encoding="utf-8").count("\n") == 20 + 1


@pytest.mark.integration
def test_canary_from_the_log_is_inconclusive_without_feedback_then_passes(live_env: dict[str, Any]) -> None:
    e = live_env
    v1, v2, _ = e["v"]
    started = _pilot(e, "canary", "--source", "log", "--version", v2)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "no canary answer" in started.stdout
    tags = _tags(e, v2)
    assert tags["pilot.stage"] == "canary" and tags["pilot.canary_fraction"] == "0.5"

    # the endpoints route by content hash; both models answer right
    now, records, truth = time.time(), [], {}
    for i in range(40):
        sha, label = _sha(f"canary-{i}"), CLASSES[i % 3]
        to_candidate = routes_to_candidate(sha, 0.5)
        records.append(
            _answer(e, v2 if to_candidate else v1, "canary" if to_candidate else "champion", sha, label, now)
        )
        truth[sha] = label
    routed = sum(r.route == "canary" for r in records)
    assert 5 <= routed <= 35
    _write(e, records)
    waiting = _pilot(e, "canary", "--source", "log", "--version", v2)
    assert waiting.returncode == 1 and "Canary inconclusive" in waiting.stdout, waiting.stdout + waiting.stderr
    assert "run this stage again later" in waiting.stdout
    assert _tags(e, v2)["pilot.stage"] == "canary" and _aliases(e) == {"champion": v1, "pilot": v2}  # traffic flows

    _write(e, [], truth)  # the operators' verdicts arrive
    passed = _pilot(e, "canary", "--source", "log", "--version", v2)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "every guardrail held" in passed.stdout
    assert _tags(e, v2)["pilot.canary.outcome"] == "passed"
    summary = json.loads((e["project"] / "artifacts" / "canary" / "summary.json").read_text(encoding="utf-8"))
    assert summary["routed"] == {"candidate": routed, "champion": 40 - routed} and summary["verdict"] == "passed"


@pytest.mark.integration
def test_canary_breach_from_the_log_since_removes_pilot(live_env: dict[str, Any]) -> None:
    e = live_env
    v1, v2, v3 = e["v"]
    bad = _pilot(e, "canary", "--source", "log", "--since", "last tuesday")
    assert bad.returncode == 2 and "last tuesday" in bad.stderr, bad.stdout + bad.stderr

    now, records, truth = time.time(), [], {}
    for i in range(20):
        sha, label = _sha(f"breach-{i}"), CLASSES[i % 3]
        records.append(_answer(e, v3, "canary", sha, CLASSES[(i + 1) % 3], now - 60))  # v3 wrong on each
        old = _sha(f"before-{i}")
        records.append(_answer(e, v3, "canary", old, label, now - 3 * 3600))  # right, but before --since
        truth |= {sha: label, old: label}
    _write(e, records, truth)
    breach = _pilot(e, "canary", "--source", "log", "--version", v3, "--since", "10m", "--skip", "shadow",
                    "--reason", "test of the live guardrail")  # fmt: skip
    assert breach.returncode == 1, breach.stdout + breach.stderr
    assert "Guardrail breach" in breach.stdout and "over the limit of 2" in breach.stdout
    assert _aliases(e) == {"champion": v1}  # pilot removed, champion untouched
    assert _tags(e, v3)["pilot.stage"] == "stopped" and _tags(e, v3)["pilot.canary.outcome"] == "breach"
    assert _tags(e, v2)["pilot.stage"] == "ended"  # v2 lost pilot when v3's canary started
    summary = json.loads((e["project"] / "artifacts" / "canary" / "summary.json").read_text(encoding="utf-8"))
    assert summary["measures"]["candidate"]["images"] == 20  # the older, right answers were left out


@pytest.mark.integration
def test_promote_after_a_live_pilot_waits_for_the_approval_and_ends_the_pilot(live_env: dict[str, Any]) -> None:
    e = live_env
    v1, v2, v3 = e["v"]
    with _at(e["server"]):  # another pilot under way when v2 is promoted
        aliases.move_alias(e["name"], "pilot", v3, expect="none", reason="a shadow of v3")
    proc = start_promote(e["env"], e["project"], e["params"], v2)
    run_id = paused_run(e["env"], e["params"], proc)
    assert _aliases(e)["champion"] == v1  # nothing moves before a person approves
    ok = vitops(e["env"], e["project"], "approve", run_id, "--approver", "alice", "--comment", "live canary clean")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    output = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.wait(timeout=120) == 0, output
    assert _aliases(e) == {"champion": v2}  # no version piloted
    assert _tags(e, v2)["pilot.stage"] == "ended" and _tags(e, v3)["pilot.stage"] == "ended"

    with _at(e["server"]):
        aliases.move_alias(e["name"], "pilot", v3, expect="none", reason="a shadow of v3 again")
    back = _pilot(e, "rollback", "--reason", "line 3 reports misreads")
    assert back.returncode == 0, back.stdout + back.stderr
    assert _aliases(e) == {"champion": v1}


def test_a_shadow_whose_every_attempt_failed_is_no_evidence(tmp_path: Path) -> None:
    e = {"name": "line", "log": tmp_path / "log"}
    versions = Versions("line", "2", "1", "2")
    window = LogWindow(e["log"], time.time() - 60, time.time() + 60)
    assert shadow_from_log(versions, window, tmp_path / "out", PilotParams()) is None  # nothing logged yet
    failed = [_answer(e, "2", "shadow", _sha(f"x{i}"), None, time.time(), status="error", error="CUDA out of memory",
                      confidence=None, champion_label="nut") for i in range(3)]  # fmt: skip
    _write(e, failed)
    result = shadow_from_log(versions, window, tmp_path / "out", PilotParams())
    assert result is not None and result.verdict == "errors" and result.summary["agreement"] is None
    assert "3 of the candidate's 3 shadow attempt(s) failed" in (tmp_path / "out" / "report.md").read_text()


def test_a_canary_breaches_on_errors_and_latency_from_the_log(tmp_path: Path) -> None:
    e = {"name": "line", "log": tmp_path / "log"}
    versions = Versions("line", "2", "1", "2")
    now = time.time()
    slow = [_answer(e, "2", "canary", _sha(f"s{i}"), "nut", now, latency_ms=900.0) for i in range(8)]
    broken = [_answer(e, "2", "canary", _sha(f"b{i}"), None, now, status="error", error="boom", confidence=None)
              for i in range(2)]  # fmt: skip
    _write(e, slow + broken)
    result = canary_from_log(versions, LogWindow(e["log"], now - 60, now + 60), tmp_path / "out", PilotParams())
    assert result is not None and result.verdict == "breach"
    failed = {c.kpi: c.reason for c in result.checks if not c.passed}
    assert "900.00 ms" in failed["latency"] and "pilot.online.max_p95_ms" in failed["latency"]
    assert "2 of the candidate's 10 canary attempt(s) failed" in failed["errors"]
