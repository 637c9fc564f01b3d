"""The endpoint's online guardrails: live checks of the pilot model over a sliding window of its logged answers.

Pure functions over two DataFrames read from the prediction log (`deploy.prediction_log.read_predictions`): the
pilot version's most recent `window` records (route shadow or canary, errors included) and the champion's records
over the same time span. The endpoint's follower asks `check_window` every `pilot.online.check_every_s`; a failed
check is a breach that stops routing to the pilot and removes its `pilot` alias.

The checks, each with a reason naming its numbers and its param key (`pilot.online.*`):

- error rate: the share of the pilot's attempts that failed;
- p95 latency (canary only: a shadow pilot runs off the response path, at low priority);
- disagreement with the champion (shadow only, where both answered the same request);
- confidence drop: the pilot's mean confidence below the champion's;
- accuracy drop, in points, on the images operators labelled (once both models have `min_feedback` of them).

Fewer than `min_samples` pilot records: every check passes, its reason saying how many answers it waits for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vitops.deploy.guardrails import accuracy
from vitops.deploy.kpi import Check, KpiError

STAGES = ("shadow", "canary")
_KEY = "pilot.online"
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class OnlineRules:
    """The limits of the online checks (params.yaml `pilot.online`, without `check_every_s`)."""

    window: int  # the pilot's most recent answers judged together
    min_samples: int  # answers in the window before any check may breach
    max_error_rate: float  # share of the pilot's attempts that failed
    max_p95_ms: float | None  # canary: p95 of the pilot's answers, arrival to answer; None = off
    max_disagreement: float | None  # shadow: share of requests labelled unlike the champion; None = off
    max_confidence_drop: float | None  # mean pilot confidence below the champion's; None = off
    max_accuracy_drop_points: float | None  # with feedback: pilot top-1 below the champion's, in points; None = off
    min_feedback: int  # labelled answers of each model before accuracy is judged

    @classmethod
    def from_params(cls, online: Any) -> OnlineRules:
        """From `params.pilot.online` (any object with these attributes; `check_every_s` is the caller's)."""
        return cls(**{f.name: getattr(online, f.name) for f in fields(cls)})


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def _ok(frame: Any) -> Any:
    return frame[frame["status"] == "ok"]


def _error_rate(pilot: Any, rules: OnlineRules) -> Check:
    n = len(pilot)
    failed = int((pilot["status"] != "ok").sum())
    rate = failed / n
    passed = rate <= rules.max_error_rate + _TOLERANCE
    return Check(
        "error_rate",
        "pilot error rate",
        passed,
        rate,
        rules.max_error_rate,
        f"{failed} of the pilot's last {n} attempts failed ({_pct(rate)}), "
        f"{'within' if passed else 'over'} the limit of {_pct(rules.max_error_rate)} ({_KEY}.max_error_rate)",
    )


def _latency(pilot: Any, limit: float) -> Check:
    answered = _ok(pilot)["latency_ms"].to_numpy(dtype=float)
    if not len(answered):
        return Check("latency", "pilot p95 ms", True, math.nan, limit, "no answer of the pilot to time yet")
    p95 = float(np.percentile(answered, 95))
    passed = p95 <= limit
    return Check(
        "latency",
        "pilot p95 ms",
        passed,
        p95,
        limit,
        f"pilot p95 {p95:.1f} ms over its last {len(answered)} answers (arrival to answer), "
        f"{'within' if passed else 'over'} the limit of {limit:g} ms ({_KEY}.max_p95_ms)",
    )


def _champion_labels(pilot: Any, champion: Any) -> Any:
    """The champion's label for each pilot record: its own champion_label, else the champion's answer to the same
    request_id."""
    paired = pilot["champion_label"].copy()
    if len(champion):
        by_request = _ok(champion).drop_duplicates("request_id", keep="last").set_index("request_id")["label"]
        paired = paired.fillna(pilot["request_id"].map(by_request))
    return paired


def _disagreement(pilot: Any, champion: Any, limit: float) -> Check:
    answered = _ok(pilot)
    theirs = _champion_labels(answered, champion)
    paired = theirs.notna()
    n = int(paired.sum())
    if not n:
        return Check("disagreement", "share unlike the champion", True, math.nan, limit, "no request answered by both")
    differ = int((answered["label"][paired] != theirs[paired]).sum())
    share = differ / n
    passed = share <= limit + _TOLERANCE
    return Check(
        "disagreement",
        "share unlike the champion",
        passed,
        share,
        limit,
        f"the pilot labelled {differ} of {n} requests unlike the champion ({_pct(share)}), "
        f"{'within' if passed else 'over'} the limit of {_pct(limit)} ({_KEY}.max_disagreement)",
    )


def _confidence(pilot: Any, champion: Any, limit: float) -> Check:
    answered = _ok(pilot)
    paired = answered["champion_confidence"].notna() & answered["confidence"].notna()
    if paired.any():  # shadow: the champion's confidence on the very same requests
        ours = float(answered["confidence"][paired].mean())
        theirs = float(answered["champion_confidence"][paired].mean())
        basis = f"the same {int(paired.sum())} requests"
    else:
        ours_all = answered["confidence"].dropna()
        theirs_all = _ok(champion)["confidence"].dropna()
        if not len(ours_all) or not len(theirs_all):
            return Check(
                "confidence",
                "mean confidence drop",
                True,
                math.nan,
                limit,
                "no confident answers of both models in the window yet",
            )
        ours, theirs = float(ours_all.mean()), float(theirs_all.mean())
        basis = f"{len(ours_all)} pilot and {len(theirs_all)} champion answers"
    drop = theirs - ours
    passed = drop <= limit + _TOLERANCE
    return Check(
        "confidence",
        "mean confidence drop",
        passed,
        drop,
        limit,
        f"mean confidence {ours:.3f} for the pilot against {theirs:.3f} for the champion over {basis}: "
        f"{'a drop' if drop > 0 else 'a gain'} of {abs(drop):.3f}, {'within' if passed else 'over'} the limit "
        f"of {limit:g} ({_KEY}.max_confidence_drop)",
    )


def _labelled(frame: Any, feedback: dict[str, str]) -> tuple[int, int]:
    """(correct, labelled) over the distinct images of `frame` that have feedback; a retried image counts once."""
    answered = _ok(frame)
    if not len(answered):
        return 0, 0
    answered = answered.drop_duplicates("sha256", keep="last")
    truth = answered["sha256"].map(feedback)
    known = truth.notna()
    return int((answered["label"][known] == truth[known]).sum()), int(known.sum())


def _accuracy(pilot: Any, champion: Any, feedback: dict[str, str], rules: OnlineRules, limit: float) -> Check:
    pilot_acc = accuracy(*_labelled(pilot, feedback))
    champion_acc = accuracy(*_labelled(champion, feedback))
    need = rules.min_feedback
    if pilot_acc.n < need or champion_acc.n < need:
        return Check(
            "accuracy",
            "top-1 drop vs champion",
            True,
            math.nan,
            limit,
            f"waiting for feedback: {pilot_acc.n} pilot and {champion_acc.n} champion answers labelled, "
            f"{need} of each are needed ({_KEY}.min_feedback)",
        )
    drop = (champion_acc.top1 - pilot_acc.top1) * 100.0
    passed = drop <= limit + _TOLERANCE
    return Check(
        "accuracy",
        "top-1 drop vs champion",
        passed,
        drop,
        limit,
        f"pilot {pilot_acc.describe()} against champion {champion_acc.describe()} on operator feedback: "
        f"{'a drop' if drop > 0 else 'a gain'} of {abs(drop):.2f} points, {'within' if passed else 'over'} the "
        f"limit of {limit:g} ({_KEY}.max_accuracy_drop_points)",
    )


def _enabled(stage: str, rules: OnlineRules) -> list[tuple[str, str, float]]:
    """(kpi, name, threshold) of the checks that apply to a stage."""
    checks = [("error_rate", "pilot error rate", rules.max_error_rate)]
    if stage == "canary" and rules.max_p95_ms is not None:
        checks.append(("latency", "pilot p95 ms", rules.max_p95_ms))
    if stage == "shadow" and rules.max_disagreement is not None:
        checks.append(("disagreement", "share unlike the champion", rules.max_disagreement))
    if rules.max_confidence_drop is not None:
        checks.append(("confidence", "mean confidence drop", rules.max_confidence_drop))
    if rules.max_accuracy_drop_points is not None:
        checks.append(("accuracy", "top-1 drop vs champion", rules.max_accuracy_drop_points))
    return checks


def check_window(pilot: Any, champion: Any, feedback: dict[str, str], stage: str, rules: OnlineRules) -> list[Check]:
    """The online checks of one window, each with a reason naming its numbers and its param key.

    Args:
        pilot: the pilot version's most recent records (route shadow or canary, errors included), a DataFrame with
            Prediction's columns; only the last `rules.window` by time are judged.
        champion: the champion's records over the same time span (may be empty, or None).
        feedback: the operators' label per sha256 (e.g. from `prediction_log.latest_labels`).
        stage: `shadow` or `canary`.
        rules: the limits.

    Returns:
        One Check per enabled check of the stage; with fewer than `min_samples` pilot records all pass, waiting.
    """
    if stage not in STAGES:
        raise KpiError(f"pilot stage {stage!r} is not one of {', '.join(STAGES)} (the version's pilot.stage tag)")
    if rules.window < 1 or rules.min_samples < 1:
        raise KpiError(f"window {rules.window} and min_samples {rules.min_samples} must be >= 1 ({_KEY})")
    if champion is None:
        champion = pilot.iloc[0:0]
    pilot = pilot.sort_values("time", kind="stable").tail(rules.window)
    champion = champion.sort_values("time", kind="stable")
    n = len(pilot)
    if n < rules.min_samples:
        waiting = (
            f"waiting for {rules.min_samples - n} answers: {n} of the pilot's answers in the window, "
            f"{rules.min_samples} are needed before any check may breach ({_KEY}.min_samples)"
        )
        return [Check(kpi, name, True, math.nan, limit, waiting) for kpi, name, limit in _enabled(stage, rules)]
    checks = [_error_rate(pilot, rules)]
    if stage == "canary" and rules.max_p95_ms is not None:
        checks.append(_latency(pilot, rules.max_p95_ms))
    if stage == "shadow" and rules.max_disagreement is not None:
        checks.append(_disagreement(pilot, champion, rules.max_disagreement))
    if rules.max_confidence_drop is not None:
        checks.append(_confidence(pilot, champion, rules.max_confidence_drop))
    if rules.max_accuracy_drop_points is not None:
        checks.append(_accuracy(pilot, champion, feedback, rules, rules.max_accuracy_drop_points))
    return checks


def breaches(checks: list[Check]) -> list[Check]:
    """The checks that failed: any one of them stops the pilot."""
    return [check for check in checks if not check.passed]


def breach_reasons(checks: list[Check]) -> str:
    """The failed checks' reasons in one line (for the `pilot.online.breach` tag and the event); "" if none."""
    return "; ".join(f"{check.kpi}: {check.reason}" for check in breaches(checks))
