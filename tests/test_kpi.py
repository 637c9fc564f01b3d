"""The KPI core: McNemar and paired bootstrap against known values, cost formulas on a worked example,
and the gate's checks and decision at and around their thresholds."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from vitops.deploy.kpi import (
    Check,
    Cost,
    GateRules,
    KpiError,
    Latency,
    ModelKpis,
    Prices,
    Uplift,
    check_accuracy,
    check_cost,
    check_latency,
    cost_of,
    decide,
    kpi_metrics,
    mcnemar_exact,
    paired_uplift,
)

PRICES = dict(
    currency="USD",
    train_price_per_hour=4.0,
    serve_price_per_hour=0.20,
    utilisation=0.5,
    retrains_per_month=4.0,
    images_per_month=2_000_000.0,
    upkeep_per_month=300.0,
)


def _outcomes(n: int, both: int, candidate_only: int, reference_only: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness with the given concordant-right and discordant counts (the rest both wrong)."""
    cand = np.zeros(n, dtype=bool)
    ref = np.zeros(n, dtype=bool)
    cand[:both] = ref[:both] = True
    cand[both : both + candidate_only] = True
    ref[both + candidate_only : both + candidate_only + reference_only] = True
    return cand, ref


def _uplift(points: float, low: float, high: float, p: float = 0.3) -> Uplift:
    return Uplift(points, low, high, 0.95, p, 1000, 20, 15, 0.90, 0.90 - points / 100)


def _model(label: str, p95: float = 10.0, engine: str = "onnxruntime-int8", tco: float = 310.0) -> ModelKpis:
    cost = Cost("USD", 0.5, 100.0, 2.0, 1.111, 8.0, 2.222, tco - 10.222, tco)
    return ModelKpis(label, 0.95, Latency(engine, p95 / 2, p95, p95 * 1.2, 100.0, [1.0, 2.0]), cost)


# --- McNemar ---------------------------------------------------------------------------------------------


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10, abs=1e-12)  # 0.021484375
    assert mcnemar_exact(9, 1) == pytest.approx(0.021484375, abs=1e-12)
    assert mcnemar_exact(2, 10) == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12, abs=1e-12)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(KpiError, match="b=-1"):
        mcnemar_exact(-1, 3)


# --- paired bootstrap ------------------------------------------------------------------------------------


def test_uplift_counts_and_estimate() -> None:
    cand, ref = _outcomes(200, both=150, candidate_only=12, reference_only=3)
    u = paired_uplift(cand, ref, samples=2000)
    assert (u.n, u.candidate_only, u.reference_only) == (200, 12, 3)
    assert u.points == pytest.approx(4.5)  # (12 - 3) / 200 images
    assert u.candidate_top1 == pytest.approx(162 / 200) and u.reference_top1 == pytest.approx(153 / 200)
    assert u.p_value == mcnemar_exact(12, 3)
    assert u.low <= u.points <= u.high
    assert json.loads(json.dumps(u.as_dict()))["points"] == pytest.approx(4.5)


def test_big_difference_excludes_zero() -> None:
    cand, ref = _outcomes(400, both=270, candidate_only=110, reference_only=10)
    u = paired_uplift(cand, ref, samples=2000, seed=1)
    assert 0 < u.low <= u.points <= u.high
    assert u.p_value < 1e-6


def test_identical_or_constant_difference_gives_a_point_interval_without_warnings() -> None:
    cand, _ = _outcomes(50, both=40, candidate_only=0, reference_only=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = paired_uplift(cand, cand.copy())
        constant = paired_uplift([1, 1, 1, 1], [0, 0, 0, 0])
    assert (same.points, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (constant.points, constant.low, constant.high) == (100.0, 100.0, 100.0)


def test_bootstrap_is_reproducible_by_seed() -> None:
    cand, ref = _outcomes(300, both=200, candidate_only=30, reference_only=20)
    a = paired_uplift(cand, ref, samples=1000, seed=7)
    b = paired_uplift(cand, ref, samples=1000, seed=7)
    assert (a.low, a.high) == (b.low, b.high)


def test_bootstrap_matches_a_hand_computed_percentile_interval() -> None:
    """Same generator, same draws: scipy resamples image indices as `rng.integers(0, n, (samples, n))`."""
    rng = np.random.default_rng(11)
    cand, ref = rng.random(25) < 0.8, rng.random(25) < 0.6
    u = paired_uplift(cand, ref, confidence=0.9, samples=3000, seed=5)
    index = np.random.default_rng(5).integers(0, 25, (3000, 25))
    diffs = cand[index].mean(axis=1) - ref[index].mean(axis=1)
    low, high = np.percentile(diffs, [5, 95]) * 100
    assert (u.low, u.high) == pytest.approx((low, high), abs=1e-9)


def test_bootstrap_agrees_with_the_normal_approximation_on_a_large_split() -> None:
    cand, ref = _outcomes(2000, both=1700, candidate_only=90, reference_only=50)
    u = paired_uplift(cand, ref, samples=4000)
    d = cand.astype(float) - ref
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size) * 100  # Wald interval of the paired difference, points
    assert u.low == pytest.approx(u.points - half, abs=0.25)
    assert u.high == pytest.approx(u.points + half, abs=0.25)


@pytest.mark.parametrize(
    ("cand", "ref", "match"),
    [
        ([1, 0, 1], [1, 0], "differ in length"),
        ([], [], "non-empty"),
        ([[1, 0]], [[1, 0]], "1-D"),
        ([1, 2], [1, 0], "True/False"),
    ],
)
def test_bad_outcomes_raise(cand: list, ref: list, match: str) -> None:
    with pytest.raises(KpiError, match=match):
        paired_uplift(cand, ref)


def test_bad_confidence_raises() -> None:
    with pytest.raises(KpiError, match="confidence"):
        paired_uplift([1, 0], [0, 1], confidence=95)


# --- cost ------------------------------------------------------------------------------------------------


def test_cost_worked_example() -> None:
    """0.5 h of training at 4 USD/h: 2 USD per training run, x 4 retrains = 8 USD per month.
    Serving at 0.20 USD/h, 100 img/s, 50 % utilisation: 0.20 / (100 x 3600) / 0.5 = 1/900000 USD per image,
    i.e. 10/9 = 1.1111 USD per million; 2,000,000 images a month = 20/9 = 2.2222 USD.
    Monthly TCO = 8 + 20/9 + 300 upkeep = 310.2222 USD."""
    cost = cost_of(0.5, 100.0, Prices(**PRICES))
    assert cost.training == pytest.approx(2.0)
    assert cost.serving_per_million == pytest.approx(10 / 9)
    assert cost.monthly_training == pytest.approx(8.0)
    assert cost.monthly_serving == pytest.approx(20 / 9)
    assert cost.monthly_upkeep == 300.0
    assert cost.monthly_tco == pytest.approx(308 + 20 / 9)
    assert (cost.currency, cost.train_hours, cost.throughput_ips) == ("USD", 0.5, 100.0)
    assert json.loads(json.dumps(cost.as_dict()))["monthly_tco"] == pytest.approx(310.2222, abs=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("serve_price_per_hour", -1, r"cost\.serve_price_per_hour: -1 .*>= 0 in params\.yaml"),
        ("train_price_per_hour", float("nan"), r"cost\.train_price_per_hour: nan"),
        ("upkeep_per_month", float("inf"), r"cost\.upkeep_per_month: inf"),
        ("images_per_month", None, r"cost\.images_per_month: missing"),
        ("retrains_per_month", "4", r"cost\.retrains_per_month: '4'"),
        ("utilisation", 0.0, r"cost\.utilisation: 0\.0 must be in \(0, 1\]"),
        ("utilisation", 1.5, r"cost\.utilisation: 1\.5"),
        ("currency", "", r"cost\.currency"),
    ],
)
def test_bad_prices_name_the_field(key: str, value: object, match: str) -> None:
    with pytest.raises(KpiError, match=match):
        Prices(**{**PRICES, key: value})


def test_prices_accept_numpy_numbers_and_full_utilisation() -> None:
    Prices(**{**PRICES, "utilisation": 1.0, "retrains_per_month": np.int64(4), "upkeep_per_month": np.float64(0)})


@pytest.mark.parametrize(("hours", "ips", "match"), [(0.5, 0.0, "throughput_ips"), (-1.0, 10.0, "train_hours")])
def test_unusable_hours_or_throughput_raise(hours: float, ips: float, match: str) -> None:
    with pytest.raises(KpiError, match=match):
        cost_of(hours, ips, Prices(**PRICES))


# --- gate checks -----------------------------------------------------------------------------------------


def test_superiority_passes_and_fails() -> None:
    rules = GateRules(min_uplift_points=1.0, require_interval=True)
    ok = check_accuracy(_uplift(2.0, 1.2, 2.8), rules, "baseline resnet18")
    assert [(c.name, c.passed) for c in ok] == [("uplift_estimate", True), ("uplift_interval", True)]
    assert "superiority threshold +1.00" in ok[0].reason and "vs baseline resnet18" in ok[0].reason
    weak = check_accuracy(_uplift(2.0, 0.5, 3.5), rules, "baseline resnet18")
    assert [c.passed for c in weak] == [True, False]
    assert "interval lower bound +0.50 is below the superiority threshold +1.00" in weak[1].reason
    small = check_accuracy(_uplift(0.8, 0.5, 1.1), rules, "baseline resnet18")
    assert [c.passed for c in small] == [False, False]


def test_non_inferiority_passes_and_fails_on_the_interval() -> None:
    rules = GateRules(min_uplift_points=-0.5)
    ok = check_accuracy(_uplift(-0.3, -0.4, -0.2, p=0.32), rules, "champion v3")
    assert all(c.passed for c in ok) and len(ok) == 2
    assert ok[1].reason == (
        "uplift -0.30 points (95% CI -0.40..-0.20, McNemar p=0.32) vs champion v3: "
        "interval lower bound -0.40 clears the non-inferiority margin -0.50"
    )
    wide = check_accuracy(_uplift(-0.3, -0.9, 0.3), rules, "champion v3")
    assert [c.passed for c in wide] == [True, False]
    assert (wide[1].value, wide[1].threshold) == (-0.9, -0.5)
    assert "interval lower bound -0.90 is below the non-inferiority margin -0.50" in wide[1].reason
    only_estimate = check_accuracy(_uplift(-0.3, -0.9, 0.3), GateRules(-0.5, require_interval=False), "champion v3")
    assert [(c.name, c.passed) for c in only_estimate] == [("uplift_estimate", True)]


def test_an_estimate_equal_to_the_margin_passes() -> None:
    cand, ref = _outcomes(1000, both=900, candidate_only=10, reference_only=15)  # -5 images of 1000 = -0.5 points
    u = paired_uplift(cand, ref, samples=500)
    assert check_accuracy(u, GateRules(-0.5, require_interval=False), "champion v3")[0].passed
    no_loss = check_accuracy(paired_uplift(cand, cand), GateRules(0.0), "champion v3")
    assert all(c.passed for c in no_loss) and "no-loss threshold" in no_loss[0].reason


def test_latency_check_names_engine_and_numbers() -> None:
    rules = GateRules(max_p95_ms=50.0)
    [slow] = check_latency(_model("candidate v7", 61.23), rules, _model("champion v3", 40.0, "tensorrt-fp16"))
    assert not slow.passed and (slow.kpi, slow.name, slow.value, slow.threshold) == ("latency", "p95_ms", 61.23, 50.0)
    assert "61.23 ms on onnxruntime-int8 exceeds the limit 50.00 ms" in slow.reason
    assert "champion v3: p95 40.00 ms on tensorrt-fp16" in slow.reason
    [fast] = check_latency(_model("candidate v7", 50.0), rules, None)
    assert fast.passed and "within" in fast.reason
    assert check_latency(_model("candidate v7", 500.0), GateRules(max_p95_ms=None), None) == []


def test_tco_increase_fails_with_both_tcos_in_the_reason() -> None:
    rules = GateRules(max_tco_increase=0.10, max_monthly_tco=1000.0)
    checks = check_cost(_model("candidate v7", tco=400.0), _model("champion v3", tco=300.0), rules)
    assert [(c.name, c.passed) for c in checks] == [("monthly_tco", True), ("tco_increase", False)]
    reason = checks[1].reason
    assert "400.00 USD" in reason and "champion v3 300.00 USD" in reason and "+33.3%" in reason
    assert "+10%" in reason and "330.00 USD" in reason
    assert checks[1].threshold == pytest.approx(330.0)
    [ceiling] = check_cost(_model("candidate v7", tco=1200.0), None, rules)  # no reference: no increase check
    assert not ceiling.passed and "1,200.00 USD exceeds the ceiling 1,000.00 USD" in ceiling.reason
    assert check_cost(_model("candidate v7"), _model("champion v3"), GateRules()) == []


def test_decide_combines_checks() -> None:
    good = Check("accuracy", "uplift_estimate", True, 0.2, -0.5, "fine")
    bad = Check("latency", "p95_ms", False, 61.2, 50.0, "slow")
    passed = decide([good, good])
    assert passed.passed and passed.summary() == "passed: 2 of 2 checks"
    failed = decide([good, bad])
    assert not failed.passed
    assert failed.summary() == "failed 1 of 2 checks: latency p95_ms 61.2 > 50"
    assert failed.reasons() == ["PASS accuracy/uplift_estimate: fine", "FAIL latency/p95_ms: slow"]
    assert json.loads(json.dumps(failed.as_dict()))["checks"][1]["passed"] is False
    empty = decide([])
    assert empty.passed and "no checks" in empty.summary()


def test_failure_reasons_say_the_shared_uplift_once() -> None:
    both = check_accuracy(_uplift(-2.08, -4.17, -0.52, p=0.12), GateRules(-2.0), "champion v1")
    [slow] = check_latency(_model("candidate v7", 61.23), GateRules(max_p95_ms=50.0), None)
    text = decide([*both, slow]).failure_reasons()
    assert text.count("uplift -2.08 points") == 1 and text.count("vs champion v1") == 1
    assert text.startswith("uplift -2.08 points (95% CI -4.17..-0.52, McNemar p=0.12) vs champion v1: estimate -2.08")
    assert "; interval lower bound -4.17 is below the non-inferiority margin -2.00; " in text
    assert text.endswith(slow.reason)
    assert decide(both[:0]).failure_reasons() == ""


def test_kpi_metrics_are_flat_numbers() -> None:
    cand, ref = _model("candidate v7", tco=330.0), _model("champion v3", tco=300.0)
    metrics = kpi_metrics(cand, ref, _uplift(0.5, -0.1, 1.3))
    for key in ("kpi.top1", "kpi.uplift_points", "kpi.uplift_low", "kpi.uplift_high", "kpi.mcnemar_p",
                "kpi.latency_p50_ms", "kpi.latency_p95_ms", "kpi.latency_p99_ms", "kpi.throughput_ips",
                "kpi.train_hours", "kpi.training_cost", "kpi.serving_per_million", "kpi.monthly_tco",
                "reference.top1", "reference.latency_p95_ms", "reference.monthly_tco"):  # fmt: skip
        assert isinstance(metrics[key], float), key
    assert metrics["kpi.tco_increase"] == pytest.approx(0.1)
    alone = kpi_metrics(cand, None, None)
    assert not any(k.startswith("reference.") or "uplift" in k for k in alone)
