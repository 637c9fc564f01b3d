"""The pilot's pure decisions: canary routing by content hash, accuracy intervals, the canary guardrails and
what `promote` requires before it asks anyone."""

from __future__ import annotations

import hashlib

import pytest

from vitops.deploy.guardrails import (
    BREACH,
    INCONCLUSIVE,
    PASSED,
    Guardrails,
    accuracy,
    agreement,
    canary_verdict,
    check_canary,
    routes_to_candidate,
)
from vitops.deploy.kpi import KpiError
from vitops.flows.promotion import PilotError, promotion_checks

SHAS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]


def test_canary_routing_is_stable_proportional_and_grows_by_adding_images() -> None:
    small = {s for s in SHAS if routes_to_candidate(s, 0.2)}
    large = {s for s in SHAS if routes_to_candidate(s, 0.5)}
    assert small == {s for s in SHAS if routes_to_candidate(s, 0.2)}  # a rerun routes the same way
    assert small <= large  # raising the fraction only adds images
    assert 0.17 < len(small) / len(SHAS) < 0.23 and 0.46 < len(large) / len(SHAS) < 0.54
    assert not any(routes_to_candidate(s, 0.0) for s in SHAS) and all(routes_to_candidate(s, 1.0) for s in SHAS)
    # independent of the train/val/test split, which reads the same hash's first bits
    first_bits_low = [s for s in SHAS if int(s[:13], 16) / float(1 << 52) < 0.5]
    share = sum(routes_to_candidate(s, 0.5) for s in first_bits_low) / len(first_bits_low)
    assert 0.44 < share < 0.56
    with pytest.raises(KpiError, match="fraction"):
        routes_to_candidate(SHAS[0], 1.5)


def test_accuracy_interval_is_wilson_and_handles_the_edges() -> None:
    acc = accuracy(45, 50)
    assert acc.top1 == 0.9 and acc.low < 0.9 < acc.high
    assert acc.low == pytest.approx(0.7864, abs=1e-3) and acc.high == pytest.approx(0.9565, abs=1e-3)
    perfect = accuracy(20, 20)
    assert perfect.high == pytest.approx(1.0) and 0.8 < perfect.low < 0.85  # no [1, 1] from a normal approximation
    assert accuracy(0, 0).top1 is None and accuracy(0, 0).describe() == "no labelled images"
    assert "45/50" in acc.describe()
    with pytest.raises(KpiError):
        accuracy(6, 5)
    assert agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75 and agreement([], []) is None


RULES = Guardrails(max_accuracy_drop_points=2.0, max_p95_ms=10.0, min_labelled=20)


def test_canary_verdicts_name_their_numbers() -> None:
    champion = accuracy(95, 100)
    ok = check_canary(accuracy(38, 40), champion, 3.0, RULES)  # 95.0 vs 95.0
    assert canary_verdict(ok) == PASSED and [c.kpi for c in ok] == ["evidence", "accuracy", "latency"]
    worse = check_canary(accuracy(36, 40), champion, 3.0, RULES)  # 90.0 vs 95.0: 5 points down
    assert canary_verdict(worse) == BREACH
    failed = next(c for c in worse if not c.passed)
    assert failed.kpi == "accuracy" and failed.value == pytest.approx(5.0) and "over the limit of 2" in failed.reason
    slow = check_canary(accuracy(38, 40), champion, 12.5, RULES)
    assert canary_verdict(slow) == BREACH and "12.50 ms" in next(c.reason for c in slow if not c.passed)
    thin = check_canary(accuracy(5, 5), champion, 3.0, RULES)
    assert canary_verdict(thin) == INCONCLUSIVE and "label more images" in thin[0].reason
    first = check_canary(accuracy(30, 30), None, 3.0, RULES)  # no champion yet: no comparison to make
    assert canary_verdict(first) == PASSED and "accuracy" not in [c.kpi for c in first]
    # a slow candidate with too few labels is a breach: the latency guardrail needs no labels
    assert canary_verdict(check_canary(accuracy(5, 5), champion, 99.0, RULES)) == BREACH


def test_promotion_requires_gate_shadow_and_canary_unless_skipped_with_a_reason() -> None:
    full = {"gate.passed": "true", "pilot.shadow.run_id": "r1", "pilot.canary.outcome": "passed"}
    assert all(r.met for r in promotion_checks(full, [], ""))
    breach = full | {"pilot.canary.outcome": "breach", "pilot.canary.reasons": "p95 12 ms over 10"}
    found = {r.name: r for r in promotion_checks(breach, [], "")}
    assert not found["canary"].met and "p95 12 ms" in found["canary"].detail
    bare = {"gate.passed": "true"}
    skipped = {r.name: r for r in promotion_checks(bare, ["shadow", "canary"], "hotfix, approved by QA lead")}
    assert skipped["shadow"].overridden and "hotfix" in skipped["shadow"].detail and not skipped["gate"].overridden
    with pytest.raises(PilotError, match="needs a reason"):
        promotion_checks(bare, ["shadow"], "  ")
    with pytest.raises(PilotError, match="only"):
        promotion_checks(bare, ["approval"], "no")
