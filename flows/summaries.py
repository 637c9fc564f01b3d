"""What people read in the MLflow UI about a candidate: Markdown built from the gate's decision and the
version's records, for the registered version's description and the retrain run's.

    gate_markdown(decision, facts, links)   verdict, KPI table with the interval, checks, engine served, data
                                            version, code, registration, links                   -> Markdown
    data_gate_markdown(failures, links)     a data gate that said no: its failures and links      -> Markdown
    key_params(params, inputs)              the parameters of a retrain worth a column in the run list

Tags stay for machines (`gate.passed`, `kpi.*`, ...); these texts are for people. Pure functions: the callers
fetch the links (`tracking.run_link`) and write the text (`flows/registration.py`, `flows/records.py`).
"""

from __future__ import annotations

from typing import Any

from vitops.flows.config import Params

SHOWN = 10  # rejected files named in a data gate's description
# params.yaml keys a reviewer compares between retrains, by section.
_KEY_PARAMS = {
    "train": ("model", "source", "teacher", "epochs", "batch_size", "lr", "img_size"),
    "engine": ("target",),
    "gate": ("reference", "min_uplift_points", "require_interval", "confidence", "max_p95_ms", "max_monthly_tco",
             "max_tco_increase"),
}  # fmt: skip


def gate_markdown(decision: dict[str, Any], facts: dict[str, str], links: dict[str, str]) -> str:
    """The gate's verdict for people, from `decision.json`.

    Args:
        decision: the gate's `decision.json`.
        facts: `model`, `version`, `alias` (what happened to `candidate`), `engine` (served, with why),
            `data_version`, `validation` (the data gate's summary), `git_commit`, `params_hash`; missing ones are
            left out.
        links: title -> URL (relative MLflow UI links work on any host), in the order shown.
    """
    verdict = "PASSED" if decision["passed"] else "FAILED"
    reference = f"{decision.get('reference_kind', '?')} {decision.get('reference_version') or ''}".strip()
    checks = decision["decision"].get("checks", [])
    lines = [
        f"### KPI gate {verdict} against the {reference}",
        "",
        f"**{decision['decision'].get('summary', '')}**",
        "",
        decision.get("kpi_table_markdown") or "(no KPI table recorded: rerun `vitops gate`)",
        "",
        *[f"- {'PASS' if c['passed'] else '**FAIL**'} {c['kpi']}/{c['name']}: {c['reason']}" for c in checks],
        "",
        "| | |",
        "|---|---|",
    ]
    rows = {
        "registered": f"{facts['model']} version {facts['version']}" if facts.get("version") else "",
        "candidate alias": facts.get("alias", ""),
        "engine served": facts.get("engine", ""),
        "data version": facts.get("data_version", ""),
        "data gate": facts.get("validation", ""),
        "code": " · ".join(f"{k} `{facts[k]}`" for k in ("git_commit", "params_hash") if facts.get(k)),
    }
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows.items() if value]
    return "\n".join([*lines, "", _links(links)]).rstrip() + "\n"


def data_gate_markdown(failures: list[str], links: dict[str, str], rejected: list[dict[str, str]] = ()) -> str:
    """A data gate that said no: nothing was trained or registered. The first `SHOWN` rejected files are named
    with their reasons; the report has them all."""
    lines = ["### Data gate FAILED: nothing trained, nothing registered", ""]
    lines += [f"- {failure}" for failure in failures] or ["- see the validation report"]
    if rejected:
        lines += ["", f"Rejected files ({len(rejected)}):", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{_cell(r.get('path', '?'))}` | {_cell(r.get('reason', ''))} |" for r in rejected[:SHOWN]]
        lines += [f"| ... | {len(rejected) - SHOWN} more in the report |"] if len(rejected) > SHOWN else []
    return "\n".join([*lines, "", _links(links)]).rstrip() + "\n"


def key_params(params: Params, inputs: dict[str, str]) -> dict[str, Any]:
    """The retrain's key parameters (`train.lr`, `gate.max_p95_ms`, ...) and its inputs (data version, params hash,
    code version), flat, for the run's parameters."""
    flat = {f"{section}.{key}": getattr(getattr(params, section), key)
            for section, keys in _KEY_PARAMS.items() for key in keys}  # fmt: skip
    return flat | inputs


def engine_fact(decision: dict[str, Any], serving: dict[str, Any]) -> str:
    """The engine the version serves with, its batch-1 latency, and why it was chosen."""
    latency = decision.get("candidate", {}).get("latency", {})
    target = serving.get("target_engine") or {}
    engine = target.get("backend") or latency.get("engine", "?")
    timing = f" (p50 {latency['p50_ms']:.2f} ms, p95 {latency['p95_ms']:.2f} ms)" if "p95_ms" in latency else ""
    return f"{engine}{timing}" + (f": {target['reason']}" if target.get("reason") else "")


def _links(links: dict[str, str]) -> str:
    return " · ".join(f"[{title}]({url})" for title, url in links.items() if url)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
