"""The report of one pilot stage: a Markdown page with the per-model table, the guardrail checks, the rejected
files and the disagreements, and a picture grid of a sample of the disagreements.

Plain files from plain numbers (like `deploy/kpi_report.py`); the flow layer logs them to MLflow and Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.deploy.kpi import Check
from vitops.deploy.kpi_report import pyplot, save_figure


@dataclass
class ModelRow:
    """One model's measurements in a pilot stage."""

    role: str  # champion | candidate
    version: str
    engine: str
    images: int
    accuracy: str  # Accuracy.describe()
    p50_ms: float | None
    p95_ms: float | None


def model_table(rows: list[ModelRow]) -> str:
    """The per-model Markdown table."""
    lines = [
        "| model | version | engine | images answered | top-1 on labelled | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p50 = "-" if r.p50_ms is None else f"{r.p50_ms:.2f}"
        p95 = "-" if r.p95_ms is None else f"{r.p95_ms:.2f}"
        lines.append(f"| {r.role} | {r.version} | {r.engine} | {r.images} | {r.accuracy} | {p50} | {p95} |")
    return "\n".join(lines)


def write_grid(out: Path, items: list[dict[str, Any]], root: Path, columns: int = 8) -> Path | None:
    """A picture grid of disagreements: each image with both answers (and the label when known).

    Args:
        out: the PNG to write.
        items: rows with `path` (relative to `root`), `champion_label`, `champion_confidence`,
            `candidate_label`, `candidate_confidence` and `label` ("" when unlabelled).
        root: the batch folder.
        columns: images per row.

    Returns:
        The PNG, or None when there is nothing to show.
    """
    from PIL import Image

    if not items:
        return None
    plt = pyplot()
    cols = min(columns, len(items))
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items, strict=False):
        with Image.open(root / item["path"]) as img:
            ax.imshow(img.convert("RGB"))
        title = (
            f"champ {item['champion_label']} ({item['champion_confidence']:.2f})\n"
            f"cand {item['candidate_label']} ({item['candidate_confidence']:.2f})"
        )
        if item.get("label"):
            title += f"\ntrue {item['label']}"
        ax.set_title(title, fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    return out


def write_report(
    out: Path,
    title: str,
    context: dict[str, str],
    rows: list[ModelRow],
    summary: list[str],
    checks: list[Check],
    rejected: list[dict[str, str]],
    disagreements: list[dict[str, Any]],
    grid: Path | None,
    warnings: list[str],
) -> Path:
    """Write the stage's Markdown report.

    Args:
        out: the Markdown file.
        title: its heading.
        context: header rows (model, versions, batch, flow run, ...).
        rows: the per-model measurements.
        summary: sentences under the table (agreement, uplift, the verdict).
        checks: guardrail checks (canary), empty otherwise.
        rejected: the batch files the data gate rejected, with reasons; they were never scored.
        disagreements: images where the two models disagree (shadow), all listed.
        grid: the picture grid of a sample of them, beside `out`.
        warnings: drift and other warnings of the batch gate.
    """
    lines = [f"# {title}", "", *[f"- **{k}**: {v}" for k, v in context.items()], "", model_table(rows), ""]
    lines += [f"{s}" for s in summary] + [""]
    if checks:
        lines += ["## Guardrails", "", "| check | verdict | value | limit | reason |", "|---|---|---|---|---|"]
        for c in checks:
            verdict = "PASS" if c.passed else "FAIL"
            lines.append(f"| {c.kpi}: {c.name} | {verdict} | {c.value:.2f} | {c.threshold:g} | {c.reason} |")
        lines.append("")
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    if rejected:
        lines += [f"## Rejected files ({len(rejected)}, skipped, never scored)", ""]
        lines += [f"- `{r['path']}`: {r['reason']}" for r in rejected] + [""]
    if disagreements:
        lines += [f"## Disagreements ({len(disagreements)})", ""]
        if grid is not None:
            lines += [f"![a sample of the disagreements]({grid.name})", ""]
        lines += ["| image | label | champion | candidate |", "|---|---|---|---|"]
        for d in disagreements:
            lines.append(
                f"| `{d['path']}` | {d.get('label') or '-'} | {d['champion_label']} ({d['champion_confidence']:.2f}) "
                f"| {d['candidate_label']} ({d['candidate_confidence']:.2f}) |"
            )
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
