"""The three KPIs of the promotion gate (accuracy uplift, batch-1 latency, monthly TCO) and the gate's decision.

Pure functions over plain numbers and arrays: no MLflow, Prefect or torch here. The flows layer measures a
candidate and a reference (the current champion re-evaluated on today's test split, or the CNN baseline),
builds `ModelKpis`, `Uplift` and `GateRules` from them and from `params.yaml`, and asks `decide` for a
`GateDecision` whose reasons name every number, threshold, engine and reference.

Accuracy checks pass iff `value >= min_uplift_points` (up to `_TOLERANCE`, far below one image of any test
split), where `value` is the uplift estimate and, with `require_interval`, also the bootstrap interval's lower
bound. A positive threshold is a superiority test (so the value must also be > 0), a negative one a
non-inferiority margin, and zero asks for "no worse". Latency and cost checks pass iff `value <= limit`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

_TOLERANCE = 1e-9  # points: uplift from counts (e.g. -0.5) must not fail the equal margin by a rounding error
_BOOTSTRAP_CELLS = 5_000_000  # resample indices held in memory at once (batch x images)


class KpiError(ValueError):
    """Inputs the KPIs cannot use; the message names the value and what to do."""


@dataclass
class Uplift:
    """Paired accuracy difference of candidate and reference on the same images (points = percentage points)."""

    points: float  # candidate top-1 minus reference top-1
    low: float  # paired bootstrap interval
    high: float
    confidence: float  # level of the interval, e.g. 0.95
    p_value: float  # exact two-sided McNemar test on the discordant pairs
    n: int  # paired images
    candidate_only: int  # b: images the candidate got right and the reference wrong
    reference_only: int  # c: images the reference got right and the candidate wrong
    candidate_top1: float  # fractions 0..1
    reference_top1: float

    def as_dict(self) -> dict[str, float]:
        """All fields, for JSON and MLflow."""
        return asdict(self)


def mcnemar_exact(candidate_only: int, reference_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c discordant pairs at 1/2.

    Returns:
        The p-value; 1.0 when there are no discordant pairs.
    """
    from scipy.stats import binomtest

    b, c = int(candidate_only), int(reference_only)
    if b < 0 or c < 0:
        raise KpiError(f"discordant pair counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


def paired_uplift(
    candidate_correct: Any,
    reference_correct: Any,
    confidence: float = 0.95,
    samples: int = 10_000,
    seed: int = 0,
) -> Uplift:
    """Accuracy uplift with a paired percentile bootstrap interval and McNemar's exact test.

    Images are resampled with replacement, each keeping its pair of outcomes, and the interval is the
    percentile interval of the resampled differences in accuracy. When every image has the same difference
    (e.g. identical predictions) the bootstrap distribution is a point and the interval is `[d, d]`.

    Args:
        candidate_correct: per image, whether the candidate's top-1 was right (bools or 0/1).
        reference_correct: the same for the reference, on the same images in the same order.
        confidence: level of the two-sided interval, in (0, 1).
        samples: bootstrap resamples.
        seed: seed of the resampling; the same seed gives the same interval.

    Raises:
        KpiError: empty or differently sized inputs, values other than 0/1, a bad confidence or sample count.
    """
    from scipy.stats import bootstrap

    cand, ref = _outcomes(candidate_correct, "candidate_correct"), _outcomes(reference_correct, "reference_correct")
    if cand.size != ref.size:
        raise KpiError(
            f"candidate and reference outcomes differ in length ({cand.size} vs {ref.size}); "
            "evaluate both models on the same test split"
        )
    if not 0.0 < confidence < 1.0:
        raise KpiError(f"confidence {confidence} must be in (0, 1), e.g. 0.95")
    if int(samples) < 1:
        raise KpiError(f"bootstrap samples {samples} must be >= 1, e.g. 10000")
    n = int(cand.size)
    b = int(np.sum((cand == 1) & (ref == 0)))
    c = int(np.sum((cand == 0) & (ref == 1)))
    diff = 100.0 * (b - c) / n
    per_image = cand - ref
    if np.all(per_image == per_image[0]):
        low = high = diff
    else:
        res = bootstrap(
            (cand, ref),
            lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=int(samples),
            batch=max(1, min(int(samples), _BOOTSTRAP_CELLS // n)),
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = 100.0 * float(res.confidence_interval.low), 100.0 * float(res.confidence_interval.high)
    return Uplift(
        points=diff,
        low=low,
        high=high,
        confidence=float(confidence),
        p_value=mcnemar_exact(b, c),
        n=n,
        candidate_only=b,
        reference_only=c,
        candidate_top1=float(cand.mean()),
        reference_top1=float(ref.mean()),
    )


def _outcomes(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise KpiError(f"{name} must be a non-empty 1-D array of per-image outcomes, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise KpiError(f"{name} must hold only True/False (or 1/0) per image; pass `pred == label`")
    return arr.astype(np.float64)


@dataclass
class Prices:
    """Prices and volumes of the cost KPI (`cost` in params.yaml); every number finite and >= 0."""

    currency: str
    train_price_per_hour: float
    serve_price_per_hour: float
    utilisation: float
    retrains_per_month: float
    images_per_month: float
    upkeep_per_month: float

    def __post_init__(self) -> None:
        if not isinstance(self.currency, str) or not self.currency:
            raise KpiError(f"cost.currency: {self.currency!r} is not a currency; set e.g. `currency: USD`")
        for f in fields(self):
            if f.name == "currency":
                continue
            value = getattr(self, f.name)
            if value is None:
                raise KpiError(f"cost.{f.name}: missing; set a number >= 0 in params.yaml")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise KpiError(f"cost.{f.name}: {value!r} is not usable; set a finite number >= 0 in params.yaml")
        if not 0.0 < self.utilisation <= 1.0:
            raise KpiError(
                f"cost.utilisation: {self.utilisation!r} must be in (0, 1]: the share of paid serving time spent "
                "inferring; set it in params.yaml"
            )


@dataclass
class Cost:
    """One model's costs, in `currency`."""

    currency: str
    train_hours: float  # device hours of one training run
    throughput_ips: float  # images/s on the target engine
    training: float  # one training run
    serving_per_million: float  # serving one million images at the paid utilisation
    monthly_training: float  # training x retrains per month
    monthly_serving: float  # images per month x serving cost per image
    monthly_upkeep: float
    monthly_tco: float  # the sum of the three monthly figures

    def as_dict(self) -> dict[str, float | str]:
        """All fields, for JSON."""
        return asdict(self)


def cost_of(train_hours: float, throughput_ips: float, prices: Prices) -> Cost:
    """Training cost, serving cost per million images and monthly TCO from measured hours and throughput.

    Raises:
        KpiError: negative or non-finite hours, throughput that is not > 0.
    """
    if not math.isfinite(train_hours) or train_hours < 0:
        raise KpiError(f"train_hours {train_hours!r} must be a finite number >= 0; check the training run's timing")
    if not math.isfinite(throughput_ips) or throughput_ips <= 0:
        raise KpiError(
            f"throughput_ips {throughput_ips!r} must be > 0 images/s; benchmark the model on the target engine"
        )
    training = train_hours * prices.train_price_per_hour
    per_image = prices.serve_price_per_hour / (throughput_ips * 3600.0) / prices.utilisation
    monthly_training = training * prices.retrains_per_month
    monthly_serving = prices.images_per_month * per_image
    return Cost(
        currency=prices.currency,
        train_hours=float(train_hours),
        throughput_ips=float(throughput_ips),
        training=training,
        serving_per_million=per_image * 1e6,
        monthly_training=monthly_training,
        monthly_serving=monthly_serving,
        monthly_upkeep=prices.upkeep_per_month,
        monthly_tco=monthly_training + monthly_serving + prices.upkeep_per_month,
    )


@dataclass
class Latency:
    """Batch-1 latency on one engine (e.g. `onnxruntime-int8`), with the raw samples for the plots."""

    engine: str
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_ips: float
    samples_ms: list[float] = field(default_factory=list)


@dataclass
class ModelKpis:
    """Everything the gate knows about one model; `label` names it in reasons, e.g. `champion v3`."""

    label: str
    top1: float
    latency: Latency
    cost: Cost


@dataclass
class GateRules:
    """Thresholds of the gate (`gate` in params.yaml); None turns a check off."""

    min_uplift_points: float = 0.0
    require_interval: bool = True
    max_p95_ms: float | None = None
    max_monthly_tco: float | None = None
    max_tco_increase: float | None = None


@dataclass
class Check:
    """One check of the gate: the KPI, what was compared, and a one-sentence reason with the numbers."""

    kpi: str
    name: str
    passed: bool
    value: float
    threshold: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """All fields, for JSON."""
        return asdict(self)


def check_accuracy(uplift: Uplift, rules: GateRules, reference_label: str) -> list[Check]:
    """The uplift estimate, and with `require_interval` the interval's lower bound, must be >= the threshold."""
    m = rules.min_uplift_points
    kind = {1: "superiority threshold", -1: "non-inferiority margin", 0: "no-loss threshold"}[(m > 0) - (m < 0)]
    head = (
        f"uplift {uplift.points:+.2f} points ({uplift.confidence * 100:g}% CI {uplift.low:+.2f}..{uplift.high:+.2f}, "
        f"McNemar p={uplift.p_value:.2g}) vs {reference_label}"
    )
    tests = [("uplift_estimate", "estimate", uplift.points)]
    if rules.require_interval:
        tests.append(("uplift_interval", "interval lower bound", uplift.low))
    checks = []
    for name, what, value in tests:
        passed = value >= m - _TOLERANCE
        verdict = "clears" if passed else "is below"
        checks.append(
            Check("accuracy", name, passed, value, m, f"{head}: {what} {value:+.2f} {verdict} the {kind} {m:+.2f}")
        )
    return checks


def check_latency(candidate: ModelKpis, rules: GateRules, reference: ModelKpis | None) -> list[Check]:
    """Batch-1 p95 on the target engine must be <= `max_p95_ms`; no check when that is None."""
    if rules.max_p95_ms is None:
        return []
    lat, limit = candidate.latency, rules.max_p95_ms
    passed = lat.p95_ms <= limit
    reason = (
        f"{candidate.label} p95 {lat.p95_ms:.2f} ms on {lat.engine} "
        f"{'is within' if passed else 'exceeds'} the limit {limit:.2f} ms"
    )
    if reference is not None:
        reason += f" ({reference.label}: p95 {reference.latency.p95_ms:.2f} ms on {reference.latency.engine})"
    return [Check("latency", "p95_ms", passed, lat.p95_ms, limit, reason)]


def check_cost(candidate: ModelKpis, reference: ModelKpis | None, rules: GateRules) -> list[Check]:
    """Monthly TCO must be <= `max_monthly_tco`, and <= the reference's x (1 + `max_tco_increase`).

    Both checks compare money: `value` is the candidate's monthly TCO and `threshold` the ceiling in currency.
    """
    tco, cur, checks = candidate.cost.monthly_tco, candidate.cost.currency, []
    if rules.max_monthly_tco is not None:
        limit = rules.max_monthly_tco
        passed = tco <= limit
        reason = (
            f"{candidate.label} monthly TCO {tco:,.2f} {cur} "
            f"{'is within' if passed else 'exceeds'} the ceiling {limit:,.2f} {cur}"
        )
        checks.append(Check("cost", "monthly_tco", passed, tco, limit, reason))
    if rules.max_tco_increase is not None and reference is not None:
        ref_tco = reference.cost.monthly_tco
        limit = ref_tco * (1.0 + rules.max_tco_increase)
        passed = tco <= limit
        change = f"{(tco / ref_tco - 1) * 100:+.1f}%" if ref_tco > 0 else "n/a"
        reason = (
            f"{candidate.label} monthly TCO {tco:,.2f} {cur} is {change} vs {reference.label} {ref_tco:,.2f} {cur}: "
            f"{'within' if passed else 'above'} the allowed +{rules.max_tco_increase * 100:g}% ({limit:,.2f} {cur})"
        )
        checks.append(Check("cost", "tco_increase", passed, tco, limit, reason))
    return checks


@dataclass
class GateDecision:
    """The gate's verdict: passed iff every check passed."""

    passed: bool
    checks: list[Check]

    def reasons(self) -> list[str]:
        """One line per check: `PASS accuracy/uplift_estimate: <reason>`."""
        return [f"{'PASS' if c.passed else 'FAIL'} {c.kpi}/{c.name}: {c.reason}" for c in self.checks]

    def summary(self) -> str:
        """One line, e.g. `passed: 5 of 5 checks` or `failed 2 of 5 checks: latency p95_ms 61.2 > 50; ...`."""
        total = len(self.checks)
        if total == 0:
            return "passed: no checks configured (every KPI threshold is off)"
        if self.passed:
            return f"passed: {total} of {total} checks"
        failed = [c for c in self.checks if not c.passed]
        op = {"accuracy": "<"}
        parts = [f"{c.kpi} {c.name} {c.value:.6g} {op.get(c.kpi, '>')} {c.threshold:.6g}" for c in failed]
        return f"failed {len(failed)} of {total} checks: " + "; ".join(parts)

    def failure_reasons(self) -> str:
        """The failed checks' reasons in one line, a lead they share (the uplift with its interval) said once."""
        parts, leads = [], set()
        for c in (c for c in self.checks if not c.passed):
            lead, _, rest = c.reason.partition(": ")
            parts.append(rest if lead in leads and rest else c.reason)
            leads.add(lead)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Verdict, summary and every check, for JSON and MLflow tags."""
        return {"passed": self.passed, "summary": self.summary(), "checks": [c.as_dict() for c in self.checks]}


def decide(checks: list[Check]) -> GateDecision:
    """Combine checks: the gate passes iff every check passed (vacuously with none; `summary` says so)."""
    return GateDecision(passed=all(c.passed for c in checks), checks=list(checks))


def kpi_metrics(candidate: ModelKpis, reference: ModelKpis | None, uplift: Uplift | None) -> dict[str, float]:
    """Flat numeric metrics for MLflow: `kpi.*` for the candidate and the uplift, `reference.*` for the reference."""
    out = _model_metrics("kpi", candidate)
    if uplift is not None:
        names = {"points": "uplift_points", "low": "uplift_low", "high": "uplift_high", "p_value": "mcnemar_p"}
        names |= {"n": "paired_images", "candidate_only": "candidate_only", "reference_only": "reference_only"}
        out.update({f"kpi.{key}": float(getattr(uplift, attr)) for attr, key in names.items()})
    if reference is not None:
        out.update(_model_metrics("reference", reference))
        if reference.cost.monthly_tco > 0:
            out["kpi.tco_increase"] = candidate.cost.monthly_tco / reference.cost.monthly_tco - 1.0
    return out


def _model_metrics(prefix: str, model: ModelKpis) -> dict[str, float]:
    lat, cost = model.latency, model.cost
    values = {
        "top1": model.top1,
        "latency_p50_ms": lat.p50_ms,
        "latency_p95_ms": lat.p95_ms,
        "latency_p99_ms": lat.p99_ms,
        "throughput_ips": lat.throughput_ips,
        "serving_throughput_ips": cost.throughput_ips,
        "train_hours": cost.train_hours,
        "training_cost": cost.training,
        "serving_per_million": cost.serving_per_million,
        "monthly_training": cost.monthly_training,
        "monthly_serving": cost.monthly_serving,
        "monthly_upkeep": cost.monthly_upkeep,
        "monthly_tco": cost.monthly_tco,
    }
    return {f"{prefix}.{k}": float(v) for k, v in values.items()}
