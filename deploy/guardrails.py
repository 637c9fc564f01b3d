"""The measurements and guardrails of a staged pilot: canary routing, agreement, accuracy with an interval, and
the canary's verdict.

Pure functions over plain numbers, like `deploy.kpi`: the pilot flow scores a batch of new images with the
champion and the candidate, then asks these functions what the numbers say. The canary verdict is one of

- `passed`: every guardrail holds;
- `breach`: a guardrail failed (the candidate's accuracy fell too far below the champion's, or its p95 latency
  is over the limit): the pilot ends and the candidate loses `pilot`;
- `inconclusive`: too few labelled images reached the candidate to judge its accuracy; nothing is concluded and
  the canary must run again on a larger (or more labelled) batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from vitops.deploy.kpi import Check, KpiError

PASSED, BREACH, INCONCLUSIVE = "passed", "breach", "inconclusive"
_SALT = b"vitops-canary:"  # routing must not follow the train/val/test split, which uses the hash's first bits


def routes_to_candidate(sha256: str, fraction: float) -> bool:
    """Whether an image goes to the candidate in a canary of `fraction`: a pure function of its content hash, so a
    rerun (or another machine) sends the same image the same way, and a larger fraction only adds images."""
    if not 0.0 <= fraction <= 1.0:
        raise KpiError(f"canary fraction {fraction} must be in [0, 1], e.g. 0.2")
    if len(sha256) < 13:
        raise KpiError(f"{sha256!r} is not a sha256 hex digest")
    digest = hashlib.sha256(_SALT + sha256.lower().encode("ascii")).hexdigest()
    return int(digest[:13], 16) / float(1 << 52) < fraction


@dataclass
class Accuracy:
    """Top-1 on the labelled images a model answered, with a Wilson score interval (fractions 0..1)."""

    correct: int
    n: int
    top1: float | None  # None when no labelled image was answered
    low: float | None
    high: float | None
    confidence: float

    def as_dict(self) -> dict[str, float | int | None]:
        """All fields, for JSON."""
        return asdict(self)

    def describe(self) -> str:
        """E.g. `97.50 % (78/80, 95% CI 91.3..99.3)`."""
        if self.top1 is None:
            return "no labelled images"
        pct = self.confidence * 100
        interval = f"{pct:g}% CI {self.low * 100:.1f}..{self.high * 100:.1f}"
        return f"{self.top1 * 100:.2f} % ({self.correct}/{self.n}, {interval})"


def accuracy(correct: int, n: int, confidence: float = 0.95) -> Accuracy:
    """Top-1 with a Wilson score interval, which stays inside [0, 1] and behaves at 0 or n correct."""
    from scipy.stats import binomtest

    if n < 0 or not 0 <= correct <= max(n, 0):
        raise KpiError(f"accuracy needs 0 <= correct <= n, got {correct} of {n}")
    if not 0.0 < confidence < 1.0:
        raise KpiError(f"confidence {confidence} must be in (0, 1), e.g. 0.95")
    if n == 0:
        return Accuracy(0, 0, None, None, None, confidence)
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Accuracy(int(correct), int(n), correct / n, float(ci.low), float(ci.high), confidence)


def agreement(first: list[str], second: list[str]) -> float | None:
    """Share of images on which two models give the same top-1 label (None for no images)."""
    if len(first) != len(second):
        raise KpiError(f"agreement needs answers for the same images, got {len(first)} and {len(second)}")
    if not first:
        return None
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)


@dataclass(frozen=True)
class Guardrails:
    """The canary's limits (params.yaml `pilot`)."""

    max_accuracy_drop_points: float  # candidate top-1 may trail the champion's by at most this many points
    max_p95_ms: float | None  # candidate batch-1 p95 on its engine; None = off
    min_labelled: int  # labelled images the candidate must answer before its accuracy is judged


def check_canary(
    candidate: Accuracy,
    champion: Accuracy | None,
    candidate_p95_ms: float | None,
    rules: Guardrails,
) -> list[Check]:
    """The canary's guardrail checks, each with a reason naming its numbers.

    Args:
        candidate: accuracy on the labelled images routed to the candidate.
        champion: accuracy on the labelled images routed to the champion; None when there is no champion yet
            (then only the latency guardrail and the evidence check apply).
        candidate_p95_ms: the candidate's batch-1 p95 over the images it answered.
        rules: the limits.
    """
    checks = []
    enough = candidate.n >= rules.min_labelled
    checks.append(
        Check(
            "evidence",
            "labelled canary images",
            enough,
            float(candidate.n),
            float(rules.min_labelled),
            f"{candidate.n} labelled image(s) reached the candidate; at least {rules.min_labelled} are needed to "
            "judge its accuracy (pilot.min_labelled)"
            + ("" if enough else ": label more images of the batch or raise pilot.canary_fraction"),
        )
    )
    if enough and champion is not None and champion.top1 is not None and candidate.top1 is not None:
        drop = (champion.top1 - candidate.top1) * 100.0
        ok = drop <= rules.max_accuracy_drop_points + 1e-9
        checks.append(
            Check(
                "accuracy",
                "top-1 drop vs champion",
                ok,
                drop,
                rules.max_accuracy_drop_points,
                f"candidate {candidate.describe()} against champion {champion.describe()}: "
                f"{'a drop' if drop > 0 else 'a gain'} of {abs(drop):.2f} points, "
                f"{'within' if ok else 'over'} the limit of {rules.max_accuracy_drop_points:g} "
                "(pilot.max_accuracy_drop_points)",
            )
        )
    if rules.max_p95_ms is not None:
        if candidate_p95_ms is None:
            checks.append(
                Check("latency", "p95 ms", False, float("nan"), rules.max_p95_ms, "no image reached the candidate")
            )
        else:
            ok = candidate_p95_ms <= rules.max_p95_ms
            checks.append(
                Check(
                    "latency",
                    "p95 ms",
                    ok,
                    candidate_p95_ms,
                    rules.max_p95_ms,
                    f"candidate batch-1 p95 {candidate_p95_ms:.2f} ms on its engine, "
                    f"{'within' if ok else 'over'} the limit of {rules.max_p95_ms:g} ms (pilot.max_p95_ms)",
                )
            )
    return checks


def canary_verdict(checks: list[Check]) -> str:
    """`breach` if a guardrail failed, else `inconclusive` if the evidence was too thin, else `passed`."""
    if any(not c.passed for c in checks if c.kpi != "evidence"):
        return BREACH
    if any(not c.passed for c in checks if c.kpi == "evidence"):
        return INCONCLUSIVE
    return PASSED
