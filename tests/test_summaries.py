"""The Markdown people read in the MLflow UI about a candidate: the gate's verdict with its KPI table, checks,
engine, data and links; a data gate's failures; the retrain's key parameters."""

from __future__ import annotations

from vitops.flows.config import Params
from vitops.flows.summaries import data_gate_markdown, engine_fact, gate_markdown, key_params

DECISION = {
    "passed": False,
    "decision": {
        "summary": "FAILED 1 of 3 checks",
        "checks": [
            {"kpi": "accuracy", "name": "uplift_estimate", "passed": True, "reason": "uplift +2.00 points (95% CI"},
            {"kpi": "latency", "name": "p95_ms", "passed": False, "reason": "p95 12.0 ms > 10.0 ms | on onnxruntime"},
        ],
    },
    "reference_kind": "champion",
    "reference_version": "3",
    "candidate": {"latency": {"engine": "onnxruntime-int8", "p50_ms": 4.0, "p95_ms": 12.0}},
    "kpi_table_markdown": "| KPI | candidate | reference | threshold | verdict |\n|---|---|---|---|---|",
}


def test_the_gate_markdown_says_the_verdict_the_kpis_the_engine_the_data_and_links() -> None:
    serving = {"target_engine": {"backend": "onnxruntime-int8", "reason": "fastest under parity"}}
    facts = {"model": "m", "version": "4", "alias": "not moved: the gate failed", "data_version": "abc.dir",
             "engine": engine_fact(DECISION, serving), "git_commit": "deadbeef", "params_hash": ""}  # fmt: skip
    text = gate_markdown(DECISION, facts, {"training run": "#/experiments/1/runs/r", "Data Docs": ""})
    lines = text.splitlines()
    assert lines[0] == "### KPI gate FAILED against the champion 3" and "**FAILED 1 of 3 checks**" in lines
    assert "| KPI | candidate | reference | threshold | verdict |" in lines
    assert "- **FAIL** latency/p95_ms: p95 12.0 ms > 10.0 ms | on onnxruntime" in lines
    assert "| engine served | onnxruntime-int8 (p50 4.00 ms, p95 12.00 ms): fastest under parity |" in lines
    assert "| registered | m version 4 |" in lines and "| code | git_commit `deadbeef` |" in lines
    assert "| data version | abc.dir |" in lines and not any(line.startswith("| data gate") for line in lines)
    assert lines[-1] == "[training run](#/experiments/1/runs/r)"  # a link without a URL is left out


def test_a_data_gate_failure_lists_its_failures_and_rejected_files() -> None:
    text = data_gate_markdown(["3 unreadable images", "class b: 2 images < 5"], {"validation report": "#/x"})
    assert text.splitlines() == [
        "### Data gate FAILED: nothing trained, nothing registered", "",
        "- 3 unreadable images", "- class b: 2 images < 5", "", "[validation report](#/x)",
    ]  # fmt: skip
    rejected = [{"path": f"a/{i}.png", "reason": "unreadable"} for i in range(12)]
    lines = data_gate_markdown(["12 unreadable"], {}, rejected).splitlines()
    assert "Rejected files (12):" in lines and "| `a/0.png` | unreadable |" in lines
    assert "| `a/10.png` | unreadable |" not in lines and "| ... | 2 more in the report |" in lines


def test_key_params_name_their_section() -> None:
    flat = key_params(Params(), {"data_version": "abc.dir"})
    assert flat["train.lr"] == Params().train.lr and flat["gate.reference"] == Params().gate.reference
    assert flat["engine.target"] == Params().engine.target and flat["data_version"] == "abc.dir"
