"""The KPI gate's review checks: robustness under the corruption suite and the worst class, with their rows in
the KPI table and their section of the report.

Pure functions over plain numbers, like `deploy.kpi`: each model's `ModelKpis.robustness` holds its top-1
clean (`clean`) and under each corruption (`vit.robustness`), fractions 0..1. A drop is clean minus corrupted
top-1 in points; the checks pass iff the candidate's worst drop is <= `max_worst_drop` and its mean drop is
<= `max_mean_drop`, and, when asked, iff its worst class's top-1 is >= `min_class_top1`.
"""

from __future__ import annotations

from typing import Any

from vitops.deploy.kpi import Check, GateDecision, KpiError, ModelKpis

_TOLERANCE = 1e-9


def drops(top1: dict[str, float]) -> dict[str, float]:
    """Each corruption's top-1 drop from clean, in points (positive: worse under the corruption)."""
    if "clean" not in top1:
        raise KpiError("robustness results need the clean top-1 (`clean`); rerun `vitops evaluate`")
    return {name: (top1["clean"] - value) * 100.0 for name, value in top1.items() if name != "clean"}


def check_robustness(
    candidate: ModelKpis, reference: ModelKpis | None, max_worst_drop: float | None, max_mean_drop: float | None
) -> list[Check]:
    """The worst and the mean drop of the candidate under the corruption suite; None turns a check off.

    Raises:
        KpiError: a check is on but the candidate has no robustness results.
    """
    if max_worst_drop is None and max_mean_drop is None:
        return []
    if not candidate.robustness:
        raise KpiError(
            f"{candidate.label} has no robustness results but the gate checks them: rerun `vitops evaluate` with "
            "robustness.enabled, or set gate.max_robustness_drop_points and max_mean_robustness_drop_points to null"
        )
    mine = drops(candidate.robustness)
    theirs = drops(reference.robustness) if reference is not None and reference.robustness else {}
    worst = max(mine, key=mine.get)
    mean = sum(mine.values()) / len(mine)
    checks = []
    if max_worst_drop is not None:
        ok = mine[worst] <= max_worst_drop + _TOLERANCE
        context = f" ({reference.label}: {theirs[worst]:+.2f})" if worst in theirs else ""
        reason = (
            f"{candidate.label} loses {mine[worst]:+.2f} points under {worst}, its worst corruption{context}: "
            f"{'within' if ok else 'over'} the limit of {max_worst_drop:g} points (gate.max_robustness_drop_points)"
        )
        checks.append(Check("robustness", "worst_drop", ok, mine[worst], max_worst_drop, reason))
    if max_mean_drop is not None:
        ok = mean <= max_mean_drop + _TOLERANCE
        context = f" ({reference.label}: {sum(theirs.values()) / len(theirs):+.2f})" if theirs else ""
        reason = (
            f"{candidate.label} loses {mean:+.2f} points on average over {len(mine)} corruptions{context}: "
            f"{'within' if ok else 'over'} the limit of {max_mean_drop:g} points "
            "(gate.max_mean_robustness_drop_points)"
        )
        checks.append(Check("robustness", "mean_drop", ok, mean, max_mean_drop, reason))
    return checks


def check_worst_class(sliced: dict[str, Any] | None, min_class_top1: float | None, label: str) -> list[Check]:
    """The worst class's test top-1 (with at least the slices' `min_images`) must be >= `min_class_top1`."""
    if min_class_top1 is None:
        return []
    worst = (sliced or {}).get("worst_class")
    if worst is None:
        reason = "no class has enough test images to judge (slices.min_images); the check cannot pass"
        return [Check("class", "worst_class_top1", False, float("nan"), min_class_top1, reason)]
    ok = worst["top1"] >= min_class_top1 - _TOLERANCE
    reason = (
        f"{label}'s worst class {worst['value']} has top-1 {worst['top1'] * 100:.2f} % ({worst['correct']}/"
        f"{worst['n']}, CI {worst['low'] * 100:.1f}..{worst['high'] * 100:.1f}): {'clears' if ok else 'is below'} "
        f"the floor {min_class_top1 * 100:g} % (gate.min_class_top1)"
    )
    return [Check("class", "worst_class_top1", ok, worst["top1"], min_class_top1, reason)]


def review_rows(candidate: ModelKpis, reference: ModelKpis | None, decision: GateDecision) -> list[list[str]]:
    """KPI table rows: top-1 under each corruption, the worst and mean drops, the worst class (when checked)."""
    rows: list[list[str]] = []
    if candidate.robustness:
        ref = reference.robustness if reference is not None and reference.robustness else {}
        for name, value in candidate.robustness.items():
            if name != "clean":
                other = f"{ref[name] * 100:.2f} %" if name in ref else "n/a"
                rows.append([f"top-1 under {name}", f"{value * 100:.2f} %", other, "", ""])
        mine, theirs = drops(candidate.robustness), drops(ref) if ref else {}
        worst = max(mine, key=mine.get)
        by_name = {c.name: c for c in decision.checks if c.kpi == "robustness"}
        for key, label, value, other in (
            ("worst_drop", "robustness worst drop", mine[worst], theirs.get(worst)),
            ("mean_drop", "robustness mean drop", sum(mine.values()) / len(mine),
             sum(theirs.values()) / len(theirs) if theirs else None),
        ):  # fmt: skip
            check = by_name.get(key)
            cell = f"{value:+.2f} pts" + (f" ({worst})" if key == "worst_drop" else "")
            rows.append([
                label, cell, "n/a" if other is None else f"{other:+.2f} pts",
                f"<= {check.threshold:g} pts" if check else "", ("PASS" if check.passed else "FAIL") if check else "",
            ])  # fmt: skip
    for check in (c for c in decision.checks if c.kpi == "class"):
        value = "n/a" if check.value != check.value else f"{check.value * 100:.2f} %"
        verdict = "PASS" if check.passed else "FAIL"
        rows.append(["worst class top-1", value, "", f">= {check.threshold * 100:g} %", verdict])
    return rows


def robustness_markdown(candidate: ModelKpis, reference: ModelKpis | None, severities: dict[str, Any]) -> str:
    """The robustness table for the report and the model card: corruption, severity, top-1 and drop of both."""
    if not candidate.robustness:
        return "No robustness results (robustness.enabled is off)."
    ref = reference.robustness if reference is not None and reference.robustness else {}
    ref_label = reference.label if reference is not None else "reference"
    lines = [
        f"| corruption | severity | {candidate.label} top-1 | drop | {ref_label} top-1 | drop |",
        "|---|---|---|---|---|---|",
    ]
    mine, theirs = drops(candidate.robustness), drops(ref) if ref else {}
    for name, value in sorted(candidate.robustness.items(), key=lambda item: item[0] != "clean"):  # clean first
        level = "" if name == "clean" else severities.get(name, "")
        drop = "" if name == "clean" else f"{mine[name]:+.2f}"
        other = f"{ref[name] * 100:.2f} %" if name in ref else "n/a"
        other_drop = "" if name == "clean" or name not in theirs else f"{theirs[name]:+.2f}"
        lines.append(f"| {name} | {level} | {value * 100:.2f} % | {drop} | {other} | {other_drop} |")
    return "\n".join(lines)
