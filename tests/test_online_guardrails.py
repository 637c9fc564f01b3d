"""The endpoint's online guardrails over a window of logged answers: each check breaches on a planted fault and
passes on a clean pilot, waits below min_samples, and applies only to its stage (disagreement in shadow, p95 in
canary)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import astuple, replace

import pandas as pd
import pytest

from vitops.deploy.kpi import KpiError
from vitops.deploy.online_guardrails import OnlineRules, breach_reasons, breaches, check_window
from vitops.deploy.prediction_log import PREDICTION_COLUMNS, Prediction
from vitops.flows.serving_config import OnlineGuardrails

RULES = OnlineRules(
    window=100,
    min_samples=50,
    max_error_rate=0.05,
    max_p95_ms=250.0,
    max_disagreement=0.3,
    max_confidence_drop=0.15,
    max_accuracy_drop_points=5.0,
    min_feedback=20,
)


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def truth(i: int) -> str:
    return ("ok", "scratch", "dent")[i % 3]


def champion_frame(n: int = 100) -> pd.DataFrame:
    """The champion answered every request right, at 0.9 confidence."""
    rows = [
        Prediction(1e9 + i, f"r{i}", sha(i), "line", "1", "ort", truth(i), 0.9, 20.0, "champion", "s") for i in range(n)
    ]
    return pd.DataFrame([astuple(r) for r in rows], columns=PREDICTION_COLUMNS)


def pilot_frame(stage: str, n: int = 100, **faults: float) -> pd.DataFrame:
    """A pilot like the champion, with planted faults: shares of `errors` and `wrong` answers, its `latency_ms`,
    its `confidence`."""
    rows = []
    for i in range(n):
        wrong = i < faults.get("wrong", 0.0) * n
        record = Prediction(
            1e9 + i + 0.5,
            f"r{i}",
            sha(i),
            "line",
            "2",
            "ort",
            "dent" if wrong and truth(i) != "dent" else ("ok" if wrong else truth(i)),
            faults.get("confidence", 0.88),
            faults.get("latency_ms", 40.0),
            stage,
            "s",
            champion_label=truth(i) if stage == "shadow" else None,
            champion_confidence=0.9 if stage == "shadow" else None,
        )
        if i >= n - faults.get("errors", 0.0) * n:
            record = replace(record, status="error", error="RuntimeError", label=None, confidence=None)
        rows.append(record)
    return pd.DataFrame([astuple(r) for r in rows], columns=PREDICTION_COLUMNS)


FEEDBACK = {sha(i): truth(i) for i in range(100)}


def by_kpi(checks) -> dict:
    return {check.kpi: check for check in checks}


@pytest.mark.parametrize("stage", ["shadow", "canary"])
def test_a_clean_pilot_passes_every_check_of_its_stage(stage: str) -> None:
    checks = check_window(pilot_frame(stage), champion_frame(), FEEDBACK, stage, RULES)
    assert breaches(checks) == [] and breach_reasons(checks) == ""
    expected = {"error_rate", "confidence", "accuracy"} | ({"disagreement"} if stage == "shadow" else {"latency"})
    assert set(by_kpi(checks)) == expected
    for check in checks:
        assert "pilot.online." in check.reason and not math.isnan(check.value)


@pytest.mark.parametrize(
    ("stage", "fault", "kpi", "key"),
    [
        ("shadow", {"errors": 0.2}, "error_rate", "max_error_rate"),
        ("canary", {"errors": 0.2}, "error_rate", "max_error_rate"),
        ("canary", {"latency_ms": 400.0}, "latency", "max_p95_ms"),
        ("shadow", {"wrong": 0.5}, "disagreement", "max_disagreement"),
        ("shadow", {"confidence": 0.6}, "confidence", "max_confidence_drop"),
        ("canary", {"confidence": 0.6}, "confidence", "max_confidence_drop"),
        ("canary", {"wrong": 0.2}, "accuracy", "max_accuracy_drop_points"),
    ],
)
def test_each_check_breaches_on_a_planted_fault(stage: str, fault: dict, kpi: str, key: str) -> None:
    checks = check_window(pilot_frame(stage, **fault), champion_frame(), FEEDBACK, stage, RULES)
    failed = breaches(checks)
    assert kpi in {c.kpi for c in failed}
    check = by_kpi(checks)[kpi]
    assert check.value > check.threshold == getattr(RULES, key)
    assert f"pilot.online.{key}" in check.reason and "over the limit" in check.reason
    assert f"{kpi}: " in breach_reasons(checks)


def test_numbers_in_the_reasons() -> None:
    checks = by_kpi(check_window(pilot_frame("shadow", wrong=0.5, errors=0.1), champion_frame(), {}, "shadow", RULES))
    assert checks["error_rate"].value == pytest.approx(0.1)
    assert "10 of the pilot's last 100 attempts failed (10.0 %)" in checks["error_rate"].reason
    assert checks["disagreement"].value == pytest.approx(50 / 90)
    assert "50 of 90 requests unlike the champion" in checks["disagreement"].reason


def test_fewer_than_min_samples_passes_every_check_waiting() -> None:
    checks = check_window(
        pilot_frame("canary", 49, errors=1.0, latency_ms=900.0), champion_frame(), {}, "canary", RULES
    )
    assert breaches(checks) == []
    assert {c.kpi for c in checks} == {"error_rate", "latency", "confidence", "accuracy"}
    for check in checks:
        assert check.reason.startswith("waiting for 1 answers") and "pilot.online.min_samples" in check.reason


def test_accuracy_waits_for_min_feedback_of_each_model() -> None:
    few = {s: label for s, label in list(FEEDBACK.items())[:19]}
    check = by_kpi(check_window(pilot_frame("canary", wrong=0.5), champion_frame(), few, "canary", RULES))["accuracy"]
    assert check.passed and "waiting for feedback: 19 pilot and 19 champion" in check.reason
    assert "pilot.online.min_feedback" in check.reason


def test_disagreement_only_in_shadow_and_p95_only_in_canary() -> None:
    slow_and_unlike = {"wrong": 0.6, "latency_ms": 900.0}
    shadow = by_kpi(check_window(pilot_frame("shadow", **slow_and_unlike), champion_frame(), {}, "shadow", RULES))
    canary = by_kpi(check_window(pilot_frame("canary", **slow_and_unlike), champion_frame(), {}, "canary", RULES))
    assert "latency" not in shadow and not shadow["disagreement"].passed
    assert "disagreement" not in canary and not canary["latency"].passed


def test_disagreement_pairs_by_request_id_when_the_record_lacks_the_champion_label() -> None:
    pilot = pilot_frame("shadow", wrong=0.5)
    pilot["champion_label"] = None
    check = by_kpi(check_window(pilot, champion_frame(), {}, "shadow", RULES))["disagreement"]
    assert not check.passed and check.value == pytest.approx(0.5)


def test_only_the_most_recent_window_is_judged() -> None:
    old_errors = pilot_frame("canary", 100, errors=1.0)
    recent = pilot_frame("canary", 100)
    recent["time"] += 1000
    window = pd.concat([recent, old_errors], ignore_index=True)  # unordered on purpose
    assert breaches(check_window(window, champion_frame(), FEEDBACK, "canary", RULES)) == []


def test_switched_off_checks_are_absent_and_rules_come_from_params() -> None:
    rules = replace(RULES, max_p95_ms=None, max_confidence_drop=None, max_accuracy_drop_points=None)
    checks = check_window(pilot_frame("canary", latency_ms=900.0, confidence=0.1), None, {}, "canary", rules)
    assert [c.kpi for c in checks] == ["error_rate"] and breaches(checks) == []
    params = OnlineGuardrails(window=123, max_p95_ms=None, check_every_s=2.0)
    expected = {k: v for k, v in params.model_dump().items() if k != "check_every_s"}
    assert OnlineRules.from_params(params) == OnlineRules(**expected)
    with pytest.raises(KpiError, match="'stopped' is not one of shadow, canary"):
        check_window(pilot_frame("canary"), champion_frame(), {}, "stopped", RULES)
