"""The scoring stages of a staged pilot on live traffic: their evidence is the endpoint's prediction log
(`deploy.prediction_log`) instead of a batch folder; `flows/pilot.py` wraps them in Prefect tasks.

- `shadow_from_log`: the candidate's route-`shadow` answers in the window, each beside the champion's answer to
  the same request: agreement, every disagreement (with the image, when the endpoint kept it), and, on the images
  operators labelled (the latest feedback per sha256), both models' top-1 and their paired difference;
- `canary_from_log`: the candidate's route-`canary` answers and the champion's route-`champion` answers over the
  same window: realized accuracy from feedback with Wilson intervals, the candidate's p95 of its logged latency
  (arrival to answer) and its error rate, then the verdict of `deploy.guardrails`.

Both write into `pilot.out_dir/<stage>/` what the batch stages write (`report.md`, `predictions.csv`: one row per
logged answer with its feedback label, `summary.json`, the disagreements' picture grid), so `flows/records.py`
records them alike. No logged answer of the candidate in the window yet: they return None (the endpoints have
only just started piloting it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, utc_now
from vitops.flows.config import PilotParams
from vitops.flows.pilot_batch import CANARY, SHADOW, StageResult, Versions

# The evidence columns of predictions.csv, after the feedback label.
_CSV = ("time", "sha256", "route", "version", "engine", "label", "confidence", "latency_ms", "status", "error",
        "champion_label", "champion_confidence", "station", "request_id", "image")  # fmt: skip


@dataclass(frozen=True)
class LogWindow:
    """Where and when a stage reads the prediction log: [since, until) in unix seconds."""

    folder: Path
    since: float
    until: float

    def describe(self) -> str:
        """E.g. `artifacts/prediction-log, 2026-12-04T10:00:00Z .. 2026-12-04T11:00:00Z`."""
        return f"{self.folder}, {iso(self.since)} .. {iso(self.until)}"


def iso(t: float) -> str:
    """Unix seconds as ISO 8601 UTC to the second, e.g. `2026-12-04T10:00:00Z`."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shadow_from_log(
    versions: Versions, window: LogWindow, out: Path, settings: PilotParams, flow_run_id: str = ""
) -> StageResult | None:
    """The candidate's shadow answers against the champion's answers to the same requests.

    Returns:
        The stage's result (verdict `recorded`, or `errors` when every shadow attempt failed), or None when the
        log holds no shadow answer of the candidate in the window.
    """
    from vitops.deploy.guardrails import accuracy, agreement
    from vitops.deploy.kpi import paired_uplift
    from vitops.deploy.pilot_report import write_grid, write_report
    from vitops.deploy.prediction_log import latest_labels, read_predictions

    p = settings
    shadow = read_predictions(window.folder, window.since, window.until, model=versions.name,
                              version=versions.candidate, route=SHADOW)  # fmt: skip
    if shadow.empty:
        return None
    truth = {sha: fb.label for sha, fb in latest_labels(window.folder).items()}
    champion = _answers(window, versions, versions.champion, "champion")
    champion = champion[champion["status"] == "ok"]
    ok = shadow[shadow["status"] == "ok"]
    images = ok.drop_duplicates("sha256", keep="last")  # a retried image counts once: its latest answer
    paired = images[images["champion_label"].notna()]
    cand, champ = list(paired["label"]), list(paired["champion_label"])
    labelled = [(t, c, h) for t, c, h in zip(paired["sha256"].map(truth), cand, champ, strict=True) if _known(t)]
    measures = {
        "champion": _measures(versions.champion, champion, len(images),
                              accuracy(sum(h == t for t, _, h in labelled), len(labelled), p.confidence)),
        "candidate": _measures(versions.candidate, ok, len(images),
                               accuracy(sum(c == t for t, c, _ in labelled), len(labelled), p.confidence)),
    }  # fmt: skip
    agree = agreement(champ, cand)
    disagreements = [
        {"path": r.image or r.sha256, "sha256": r.sha256, "image": r.image, "label": truth.get(r.sha256, ""),
         "champion_label": r.champion_label, "champion_confidence": float(r.champion_confidence),
         "candidate_label": r.label, "candidate_confidence": float(r.confidence)}
        for r in paired.itertuples(index=False) if r.label != r.champion_label
    ]  # fmt: skip
    lines, warnings = [], _error_lines(shadow, "shadow")
    if agree is not None:
        lines.append(
            f"Agreement {agree * 100:.2f} % ({len(paired) - len(disagreements)}/{len(paired)} images the line sent "
            f"while the candidate shadowed the champion); {len(disagreements)} disagreement(s), listed below. "
            "Only the champion's answers were served."
        )
    else:
        lines.append(f"None of the candidate's {len(shadow)} shadow attempt(s) gave an answer to compare.")
    summary: dict[str, Any] = {"stage": SHADOW, "source": "log", "measures": measures, "counts": {},
                               "agreement": agree, "log": _log_counts(window, shadow, images, truth)}  # fmt: skip
    if labelled:
        up = paired_uplift([c == t for t, c, _ in labelled], [h == t for t, _, h in labelled], confidence=p.confidence)
        summary["uplift"] = up.as_dict()
        lines.append(
            f"On the {up.n} images with operator feedback the candidate's top-1 differs from the champion's by "
            f"{up.points:+.2f} points ({p.confidence * 100:g}% CI {up.low:+.2f}..{up.high:+.2f}, McNemar "
            f"p={up.p_value:.2g})."
        )
    else:
        lines.append("No image of the shadow has operator feedback yet: accuracy is not compared.")
    lines.append(_latency_note())
    summary |= {"disagreements": disagreements, "lines": lines}
    out.mkdir(parents=True, exist_ok=True)
    predictions = _write_predictions(out / "predictions.csv", shadow, truth)
    kept = [d | {"path": d["image"]} for d in disagreements if d["image"] and (window.folder / d["image"]).is_file()]
    grid = write_grid(out / "disagreements.png", kept[: p.grid_images], window.folder)
    title = f"Shadow pilot of {versions.name} version {versions.candidate} on live traffic"
    report = write_report(
        out / "report.md", title, _context(versions, window, flow_run_id), _rows(measures), lines, [], [],
        disagreements, grid, warnings,
    )  # fmt: skip
    atomic_write_json(out / "summary.json", _json_safe(summary))
    files = [report, predictions, out / "summary.json"] + ([grid] if grid else [])
    return StageResult(SHADOW, versions, summary, files, "recorded" if len(ok) else "errors")


def canary_from_log(
    versions: Versions, window: LogWindow, out: Path, settings: PilotParams, flow_run_id: str = ""
) -> StageResult | None:
    """The candidate's canary answers and the champion's answers over the same window, then the guardrails.

    Returns:
        The stage's result with its verdict (`passed`, `breach` or `inconclusive`), or None when the log holds
        no canary answer of the candidate in the window.
    """
    from vitops.deploy.guardrails import Guardrails, canary_verdict, check_canary
    from vitops.deploy.pilot_report import write_report
    from vitops.deploy.prediction_log import latest_labels, realized_accuracy

    p = settings
    canary = _answers(window, versions, versions.candidate, CANARY)
    if canary.empty:
        return None
    champion = _answers(window, versions, versions.champion, "champion")
    truth = {sha: fb.label for sha, fb in latest_labels(window.folder).items()}
    realized = {
        (r.version, r.route): r.accuracy
        for r in realized_accuracy(window.folder, window.since, window.until, p.confidence, versions.name)
    }
    cand_acc, champ_acc = realized.get((versions.candidate, CANARY)), realized.get((versions.champion, "champion"))
    cand_acc = cand_acc or _no_accuracy(p.confidence)
    champ_acc = champ_acc or _no_accuracy(p.confidence)
    ok = {role: frame[frame["status"] == "ok"] for role, frame in (("candidate", canary), ("champion", champion))}
    images = {role: frame["sha256"].nunique() for role, frame in ok.items()}
    measures = {
        "champion": _measures(versions.champion, ok["champion"], images["champion"], champ_acc),
        "candidate": _measures(versions.candidate, ok["candidate"], images["candidate"], cand_acc),
    }
    # The logged latency is arrival to answer, as the endpoint's online guardrail measures it: its limit applies.
    checks = check_canary(cand_acc, champ_acc, None, Guardrails(p.max_accuracy_drop_points, None, p.min_labelled))
    checks = [_evidence_reason(c) if c.kpi == "evidence" else c for c in checks]
    checks += _champion_evidence(champ_acc, p.min_labelled)
    checks += _latency_check(measures["candidate"]["p95_ms"], p.online.max_p95_ms)
    checks += _error_check(len(canary) - len(ok["candidate"]), len(canary), p.online.max_error_rate)
    verdict = canary_verdict(checks)
    lines = [
        f"The endpoints routed {images['candidate']} image(s) to the candidate and {images['champion']} to the "
        f"champion in the window (pilot.canary_fraction {p.canary_fraction:g} by content hash); "
        f"{cand_acc.n} and {champ_acc.n} of them have operator feedback.",
        f"Guardrail verdict: **{verdict}**.",
        _latency_note(),
    ]
    both = canary.assign(served_by="candidate") if champion.empty else _concat(canary, champion)
    out.mkdir(parents=True, exist_ok=True)
    predictions = _write_predictions(out / "predictions.csv", both, truth)
    title = f"Canary of {versions.name} version {versions.candidate} on live traffic"
    report = write_report(
        out / "report.md", title, _context(versions, window, flow_run_id), _rows(measures), lines, checks, [], [],
        None, _error_lines(canary, "canary"),
    )  # fmt: skip
    summary = {
        "stage": CANARY, "source": "log", "measures": measures, "counts": {}, "fraction": p.canary_fraction,
        "routed": images, "checks": [c.as_dict() for c in checks], "verdict": verdict, "lines": lines,
        "log": _log_counts(window, canary, ok["candidate"].drop_duplicates("sha256"), truth),
    }  # fmt: skip
    atomic_write_json(out / "summary.json", _json_safe(summary))
    return StageResult(CANARY, versions, summary, [report, predictions, out / "summary.json"], verdict, checks)


# ------------------------------------------------------------------------------------------------- helpers


def _answers(window: LogWindow, versions: Versions, version: str | None, route: str) -> Any:
    from vitops.deploy.prediction_log import read_predictions

    if version is None:
        return read_predictions(window.folder, 0, 0)  # no champion: no answers, the log's columns
    return read_predictions(window.folder, window.since, window.until, model=versions.name, version=version,
                            route=route)  # fmt: skip


def _measures(version: str | None, ok: Any, images: int, acc: Any) -> dict[str, Any]:
    """One model's row of the stage's summary, as the batch stages write it."""
    import numpy as np

    latency = ok["latency_ms"].dropna().to_numpy(dtype=float) if len(ok) else np.zeros(0)
    p50, p95 = (float(v) for v in np.percentile(latency, [50, 95])) if latency.size else (None, None)
    engine = str(ok["engine"].mode().iloc[0]) if len(ok) else "-"
    return {"version": version or "none", "engine": engine, "images": int(images), "accuracy": acc.as_dict(),
            "accuracy_text": acc.describe(), "p50_ms": p50, "p95_ms": p95}  # fmt: skip


def _rows(measures: dict[str, dict[str, Any]]) -> list[Any]:
    from vitops.flows.scoring import model_rows

    return model_rows(measures)


def _no_accuracy(confidence: float) -> Any:
    from vitops.deploy.guardrails import accuracy

    return accuracy(0, 0, confidence)


def _evidence_reason(check: Any) -> Any:
    """The evidence check in the words of live traffic: feedback, not a batch's labels."""
    n, needed = int(check.value), int(check.threshold)
    reason = (f"{n} canary image(s) of the candidate have operator feedback; at least {needed} are needed to judge "
              "its accuracy (pilot.min_labelled)")  # fmt: skip
    if not check.passed:
        reason += ": the canary keeps running; send feedback on more of its images, or run this stage again later"
    return dataclasses.replace(check, reason=reason)


def _champion_evidence(champion: Any, needed: int) -> list[Any]:
    from vitops.deploy.kpi import Check

    if champion.n >= needed:
        return []
    return [Check("evidence", "labelled champion images", False, float(champion.n), float(needed),
                  f"{champion.n} of the champion's images in the window have operator feedback; at least {needed} "
                  "are needed to compare the candidate with it (pilot.min_labelled)")]  # fmt: skip


def _latency_check(p95: float | None, limit: float | None) -> list[Any]:
    from vitops.deploy.kpi import Check

    if limit is None:
        return []
    if p95 is None:
        return [Check("latency", "p95 ms", True, float("nan"), limit, "no answer of the candidate to time yet")]
    ok = p95 <= limit
    return [Check("latency", "p95 ms", ok, p95, limit,
                  f"candidate p95 {p95:.2f} ms from request arrival to answer, {'within' if ok else 'over'} the "
                  f"limit of {limit:g} ms (pilot.online.max_p95_ms)")]  # fmt: skip


def _error_check(errors: int, attempts: int, limit: float) -> list[Any]:
    from vitops.deploy.kpi import Check

    rate = errors / attempts if attempts else 0.0
    ok = rate <= limit + 1e-12
    reason = (f"{errors} of the candidate's {attempts} canary attempt(s) failed ({rate * 100:.1f} %), "
              f"{'within' if ok else 'over'} the limit of {limit * 100:g} % (pilot.online.max_error_rate)")  # fmt: skip
    return [Check("errors", "error rate", ok, rate, limit, reason)]


def _error_lines(frame: Any, route: str) -> list[str]:
    failed = frame[frame["status"] != "ok"]
    if failed.empty:
        return []
    first = str(failed["error"].iloc[0]) or "no message"
    return [f"{len(failed)} of the candidate's {len(frame)} {route} attempt(s) failed, e.g.: {first}"]


def _latency_note() -> str:
    return ("Latencies are the endpoint's logged ones: request arrival to answer for the champion and a canary, "
            "dequeue to answer for a shadow (off the response path).")  # fmt: skip


def _log_counts(window: LogWindow, records: Any, images: Any, truth: dict[str, str]) -> dict[str, Any]:
    return {"dir": str(window.folder), "since": iso(window.since), "until": iso(window.until),
            "records": int(len(records)), "errors": int((records["status"] != "ok").sum()),
            "images": int(len(images)), "labelled": int(images["sha256"].map(truth).notna().sum())}  # fmt: skip


def _context(versions: Versions, window: LogWindow, flow_run_id: str) -> dict[str, str]:
    return {
        "model": versions.name,
        "candidate": f"version {versions.candidate}",
        "champion": f"version {versions.champion}" if versions.champion else "none yet",
        "evidence": f"prediction log {window.describe()}",
        "flow run": flow_run_id or "-",
        "time": utc_now(),
    }


def _concat(canary: Any, champion: Any) -> Any:
    import pandas as pd

    both = pd.concat([canary.assign(served_by="candidate"), champion.assign(served_by="champion")])
    return both.sort_values("time", kind="stable", ignore_index=True)


def _write_predictions(path: Path, frame: Any, truth: dict[str, str]) -> Path:
    """One row per logged answer of the evidence: the operators' label (if any) first, then the log's fields."""
    rows = frame.assign(feedback_label=[truth.get(sha, "") for sha in frame["sha256"]])
    rows["time"] = [datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds") for t in rows["time"]]
    columns = ["feedback_label"] + (["served_by"] if "served_by" in rows else []) + list(_CSV)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows[columns].to_csv(path, index=False)
    return path


def _known(label: Any) -> bool:
    return isinstance(label, str) and bool(label)


def _json_safe(value: Any) -> Any:
    """NaN (from a missing confidence) as null, so summary.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
