"""The KPI gate's report: the terminal table carries the numbers, and `write_report` publishes a Markdown
report with three valid PNGs, every check's reason, and a clear note when no reference was available."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitops.deploy.kpi import (
    GateDecision,
    GateRules,
    Latency,
    ModelKpis,
    Prices,
    Uplift,
    check_accuracy,
    check_cost,
    check_latency,
    cost_of,
    decide,
)
from vitops.deploy.kpi_report import format_kpi_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRICES = Prices("USD", 4.0, 0.20, 0.5, 4.0, 2_000_000.0, 300.0)
RULES = GateRules(min_uplift_points=-0.5, max_p95_ms=50.0, max_tco_increase=0.10)
CONTEXT = {"model": "vitops-vit", "version": "7", "data version": "a1b2c3", "reference": "champion", "git": "9a6d8d6"}


def _model(label: str, p95: float, engine: str, hours: float, ips: float, top1: float) -> ModelKpis:
    samples = np.random.default_rng(0).gamma(9.0, p95 / 14, size=200).tolist()
    return ModelKpis(label, top1, Latency(engine, p95 * 0.6, p95, p95 * 1.3, ips, samples), cost_of(hours, ips, PRICES))


@pytest.fixture
def models() -> tuple[ModelKpis, ModelKpis, Uplift]:
    candidate = _model("candidate v7", 61.23, "onnxruntime-int8", 0.5, 100.0, 0.9752)
    reference = _model("champion v3", 40.0, "onnxruntime-int8", 0.4, 150.0, 0.9700)
    uplift = Uplift(0.52, -0.10, 1.30, 0.95, 0.32, 1000, 20, 15, 0.9752, 0.9700)
    return candidate, reference, uplift


def _decide(candidate: ModelKpis, reference: ModelKpis | None, uplift: Uplift | None) -> GateDecision:
    checks = [] if uplift is None else check_accuracy(uplift, RULES, reference.label if reference else "?")
    return decide(checks + check_latency(candidate, RULES, reference) + check_cost(candidate, reference, RULES))


def test_table_carries_the_numbers(models: tuple[ModelKpis, ModelKpis, Uplift]) -> None:
    candidate, reference, uplift = models
    decision = _decide(candidate, reference, uplift)
    table = format_kpi_table(candidate, reference, uplift, decision)
    header, rule, *_ = table.splitlines()
    assert header.split(" | ")[0].strip() == "KPI" and set(rule) <= {"-", "+"}
    expected = ["97.52 %", "97.00 %", "+0.52 pts (95% CI -0.10..+1.30, McNemar p=0.32", "61.23 ms (onnxruntime-int8)"]
    expected += ["40.00 ms", "<= 50.00 ms", ">= -0.50 pts", "2.00 USD", "1.111 USD", "310.22 USD", "100.0 img/s"]
    for text in expected:
        assert text in table, text
    p95_row = next(line for line in table.splitlines() if line.startswith("latency p95"))
    assert p95_row.rstrip().endswith("FAIL")
    assert table.splitlines()[-1] == f"gate {decision.summary()}" and decision.summary().startswith("failed")


def test_report_writes_markdown_and_three_pngs(tmp_path: Path, models: tuple[ModelKpis, ModelKpis, Uplift]) -> None:
    candidate, reference, uplift = models
    decision = _decide(candidate, reference, uplift)
    out = tmp_path / "gate" / "report.md"
    paths = write_report(out, candidate, reference, uplift, decision, CONTEXT)
    assert paths == [out, out.parent / "accuracy.png", out.parent / "latency.png", out.parent / "cost.png"]
    for png in paths[1:]:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# KPI gate: FAILED")
    for check in decision.checks:
        assert check.reason in text
    for name in ("accuracy.png", "latency.png", "cost.png"):
        assert f"]({name})" in text
    for value in CONTEXT.values():
        assert value in text
    assert "| monthly TCO |" in text and "310.22 USD" in text


def test_report_without_a_reference(tmp_path: Path, models: tuple[ModelKpis, ModelKpis, Uplift]) -> None:
    candidate, _, _ = models
    decision = _decide(candidate, None, None)
    table = format_kpi_table(candidate, None, None, decision)
    assert "n/a (no reference)" in table and "61.23 ms" in table
    paths = write_report(tmp_path / "report.md", candidate, None, None, decision, CONTEXT)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths[1:])
    text = paths[0].read_text(encoding="utf-8")
    assert "No reference was available (champion)" in text and "unavailable (champion)" in text
    assert all(c.reason in text for c in decision.checks)


def test_report_with_no_checks_and_no_samples(tmp_path: Path, models: tuple[ModelKpis, ModelKpis, Uplift]) -> None:
    candidate, reference, uplift = models
    candidate.latency.samples_ms = []
    decision = decide([])
    paths = write_report(tmp_path / "report.md", candidate, reference, uplift, decision, {})
    assert all(p.stat().st_size > 0 for p in paths)
    text = paths[0].read_text(encoding="utf-8")
    assert "# KPI gate: PASSED" in text and "no checks configured" in text
