"""The KPI gate's report: a plain-text table for the terminal and a Markdown report with three PNG plots.

`format_kpi_table` prints candidate and reference side by side with each KPI's threshold and verdict.
`write_report` writes `report.md` plus `accuracy.png`, `latency.png` and `cost.png` beside it, every file
atomically; the PNGs go first, so a report on disk never names a missing image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitops.common.files import atomic_write
from vitops.deploy.kpi import Check, GateDecision, ModelKpis, Uplift

_COLUMNS = ["KPI", "candidate", "reference", "threshold", "verdict"]
_COLOURS = ("tab:blue", "tab:orange")


def format_kpi_table(
    candidate: ModelKpis, reference: ModelKpis | None, uplift: Uplift | None, decision: GateDecision
) -> str:
    """Plain-text table of the KPIs (KPI | candidate | reference | threshold | verdict) and the decision line."""
    rows = [_COLUMNS, *_kpi_rows(candidate, reference, uplift, decision)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([*lines, "", f"gate {decision.summary()}"])


def markdown_kpi_table(
    candidate: ModelKpis, reference: ModelKpis | None, uplift: Uplift | None, decision: GateDecision
) -> str:
    """The KPI table (KPI | candidate | reference | threshold | verdict, the uplift with its interval) as Markdown."""
    rows = _kpi_rows(candidate, reference, uplift, decision)
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def write_report(
    out: Path,
    candidate: ModelKpis,
    reference: ModelKpis | None,
    uplift: Uplift | None,
    decision: GateDecision,
    context: dict[str, str],
) -> list[Path]:
    """Write the Markdown report `out` and its plots beside it.

    Args:
        out: the Markdown file, e.g. `artifacts/gate/report.md`.
        candidate: the candidate's KPIs.
        reference: the reference's, or None when no reference was available.
        uplift: the paired uplift, or None without a reference.
        decision: the gate's decision, whose checks also give the plots their threshold lines.
        context: header rows (model, version, data version, git commit, ...); `reference` names the kind of
            reference asked for, which the report names when it was unavailable.

    Returns:
        The written paths: the Markdown file first, then `accuracy.png`, `latency.png`, `cost.png`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = [candidate] if reference is None else [candidate, reference]
    images = [
        _plot_accuracy(models, uplift, _checks(decision, "accuracy"), out.parent / "accuracy.png"),
        _plot_latency(models, _checks(decision, "latency"), out.parent / "latency.png"),
        _plot_cost(models, _checks(decision, "cost"), out.parent / "cost.png"),
    ]
    text = _markdown(candidate, reference, uplift, decision, context, images)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return [out, *images]


def _kpi_rows(
    candidate: ModelKpis, reference: ModelKpis | None, uplift: Uplift | None, decision: GateDecision
) -> list[list[str]]:
    def both(show: Any) -> list[str]:
        return [show(candidate), "n/a" if reference is None else show(reference)]

    accuracy, latency, cost = (_checks(decision, kpi) for kpi in ("accuracy", "latency", "cost"))
    if uplift is None:
        uplift_cell = "n/a (no reference)"
    else:
        uplift_cell = (
            f"{uplift.points:+.2f} pts ({uplift.confidence * 100:g}% CI {uplift.low:+.2f}..{uplift.high:+.2f}, "
            f"McNemar p={uplift.p_value:.2g}, n={uplift.n})"
        )
    uplift_limit = ""
    if accuracy:
        scope = "estimate and CI low" if len(accuracy) > 1 else "estimate"
        uplift_limit = f">= {accuracy[0].threshold:+.2f} pts ({scope})"
    p95_limit = f"<= {latency[0].threshold:.2f} ms" if latency else ""
    tco_limits = {"monthly_tco": "ceiling", "tco_increase": "vs reference"}
    tco_limit = ", ".join(f"<= {_money(candidate, c.threshold)} ({tco_limits.get(c.name, c.name)})" for c in cost)
    return [
        ["top-1", *both(lambda m: f"{m.top1 * 100:.2f} %"), "", ""],
        ["uplift", uplift_cell, "", uplift_limit, _verdict(accuracy)],
        ["latency p50", *both(lambda m: f"{m.latency.p50_ms:.2f} ms ({m.latency.engine})"), "", ""],
        [
            "latency p95",
            *both(lambda m: f"{m.latency.p95_ms:.2f} ms ({m.latency.engine})"),
            p95_limit,
            _verdict(latency),
        ],
        ["latency p99", *both(lambda m: f"{m.latency.p99_ms:.2f} ms ({m.latency.engine})"), "", ""],
        ["throughput", *both(lambda m: f"{m.latency.throughput_ips:,.1f} img/s"), "", ""],
        [
            "training cost (one run)",
            *both(lambda m: f"{_money(m, m.cost.training)} ({m.cost.train_hours:.2f} h)"),
            "",
            "",
        ],
        ["serving per 1M images", *both(lambda m: _money(m, m.cost.serving_per_million, 3)), "", ""],
        ["monthly TCO", *both(lambda m: _money(m, m.cost.monthly_tco)), tco_limit, _verdict(cost)],
    ]


def _money(model: ModelKpis, value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f} {model.cost.currency}"


def _checks(decision: GateDecision, kpi: str) -> list[Check]:
    return [c for c in decision.checks if c.kpi == kpi]


def _verdict(checks: list[Check]) -> str:
    if not checks:
        return ""
    return "PASS" if all(c.passed for c in checks) else "FAIL"


def _markdown(
    candidate: ModelKpis,
    reference: ModelKpis | None,
    uplift: Uplift | None,
    decision: GateDecision,
    context: dict[str, str],
    images: list[Path],
) -> str:
    verdict = "PASSED" if decision.passed else "FAILED"
    lines = [f"# KPI gate: {verdict}", "", f"**gate {decision.summary()}**", "", "| | |", "|---|---|"]
    wanted = context.get("reference") or "champion or baseline"
    missing = f"unavailable ({wanted})"
    header = {
        **context,
        "candidate model": candidate.label,
        "reference model": reference.label if reference else missing,
    }
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in header.items()]
    if reference is None:
        lines += [
            "",
            f"> No reference was available ({wanted}): the uplift and the TCO increase were not checked, "
            "and the plots show the candidate only.",
        ]
    lines += ["", "## KPIs", "", markdown_kpi_table(candidate, reference, uplift, decision), "", "## Checks", ""]
    lines += [f"- {line}" for line in decision.reasons()] or ["- no checks configured: every KPI threshold is off"]
    for title, image in zip(("Accuracy", "Latency", "Cost"), images, strict=True):
        lines += ["", f"## {title}", "", f"![{title.lower()}]({image.name})"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path) -> Path:
    """Write a figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        # the temp file's name ends in .tmp, so the format cannot come from the suffix
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return out


def _plot_accuracy(models: list[ModelKpis], uplift: Uplift | None, checks: list[Check], out: Path) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    top1 = [m.top1 * 100 for m in models]
    bars = left.bar([m.label for m in models], top1, color=_COLOURS[: len(models)])
    left.bar_label(bars, labels=[f"{t:.2f} %" for t in top1])
    left.set_ylim(max(0.0, min(top1) - 5.0), 100.5)  # close-up: the interesting part is the last few points
    left.set_ylabel("test top-1 (%)")
    left.set_title("top-1 accuracy")
    if uplift is None:
        right.text(0.5, 0.5, "no reference:\nuplift not measured", ha="center", va="center")
        right.set_axis_off()
    else:
        err = [[max(uplift.points - uplift.low, 0.0)], [max(uplift.high - uplift.points, 0.0)]]
        label = f"uplift {uplift.points:+.2f} ({uplift.confidence * 100:g}% CI)"
        right.errorbar([0], [uplift.points], yerr=err, fmt="o", capsize=8, color=_COLOURS[0], label=label)
        right.axhline(0.0, color="grey", linewidth=0.8)
        if checks:
            threshold = checks[0].threshold
            right.axhline(threshold, color="red", linestyle="--", label=f"min uplift {threshold:+.2f}")
        right.set_xticks([0], labels=[f"{models[0].label}\nvs {models[-1].label}"])
        right.set_xlim(-1, 1)
        right.set_ylabel("uplift (percentage points)")
        right.set_title(f"uplift, McNemar p={uplift.p_value:.2g}")
        right.legend(loc="upper right")
    return save_figure(fig, out)


def _plot_latency(models: list[ModelKpis], checks: list[Check], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    samples = [np.asarray(m.latency.samples_ms, dtype=float) for m in models]
    drawn = [s for s in samples if s.size]
    edges = np.histogram_bin_edges(np.concatenate(drawn), bins=40) if drawn else None
    for model, sample, colour in zip(models, samples, _COLOURS, strict=False):
        name = f"{model.label} ({model.latency.engine})"
        if sample.size:
            ax.hist(sample, bins=edges, alpha=0.5, color=colour, label=name)
        lat = model.latency
        ax.axvline(lat.p95_ms, color=colour, linestyle="--", label=f"{name} p95 {lat.p95_ms:.2f} ms")
        for value in (lat.p50_ms, lat.p99_ms):  # unlabelled, lighter: the legend stays readable
            ax.axvline(value, color=colour, linestyle=":", alpha=0.6)
    for check in checks:
        ax.axvline(check.threshold, color="red", linewidth=2, label=f"p95 limit {check.threshold:.2f} ms")
    ax.set_xlabel("batch-1 latency (ms)")
    ax.set_ylabel("calls")
    ax.set_title("batch-1 latency on the target engine (dotted: p50, p99)")
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, out)


def _plot_cost(models: list[ModelKpis], checks: list[Check], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [m.label for m in models]
    bottom = np.zeros(len(models))
    for part, colour in (("training", "tab:purple"), ("serving", "tab:green"), ("upkeep", "tab:grey")):
        values = np.array([getattr(m.cost, f"monthly_{part}") for m in models])
        ax.bar(labels, values, bottom=bottom, color=colour, label=part)
        bottom += values
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:,.2f}", ha="center", va="bottom")
    names = {"monthly_tco": "TCO ceiling", "tco_increase": "allowed vs reference"}
    for check, style in zip(checks, ("--", ":"), strict=False):
        ax.axhline(
            check.threshold,
            color="red",
            linestyle=style,
            label=f"{names.get(check.name, check.name)} {check.threshold:,.2f}",
        )
    currency = models[0].cost.currency
    ax.set_ylabel(f"{currency} per month")
    ax.set_title(f"monthly total cost of ownership ({currency})")
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, out)
