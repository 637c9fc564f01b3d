"""The register stage: a gated candidate becomes a new registry version, and `candidate` points at it only
when its gate passed.

    register(model_dir, inputs, model, params_hash, run)   the version with its KPI, gate, data and code tags, and
                                                           a Markdown description for people (verdict, KPI table,
                                                           engine, data, links); alias `candidate` when the gate
                                                           passed -> RegisterResult

Every evaluated candidate is registered, passed or not, so the registry's history is complete. Inside a retrain
the version is registered from the retrain's parent run (so the run page lists it and holds its KPIs); alone
(`vitops register`), from the candidate's training run. The data gate's report, manifest and Data Docs travel
with the version's run as artifacts under `data/`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import sha256_file
from vitops.deploy.engine_meta import engine_files
from vitops.flows import aliases, packaging, records, summaries, tracking
from vitops.flows.config import Params
from vitops.flows.gate import DECISION_FILE, GateInputError
from vitops.flows.tracking import RunContext


@dataclass
class RegisterResult:
    name: str
    version: str
    gate_passed: bool
    candidate: bool  # whether `candidate` now points at this version
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)  # what the descriptions say (`summaries.gate_markdown`)
    links: dict[str, str] = field(default_factory=dict)  # title -> MLflow UI link, relative (`#/experiments/...`)


@dataclass(frozen=True)
class RegisterInputs:
    """What a registration records: the gate's decision, the bench, the engines, the ONNX export, and the data
    gate's report and manifest (which travel with the version)."""

    decision: Path
    bench: Path
    engine_dir: Path
    onnx: Path
    validation_report: Path
    manifest: Path

    @classmethod
    def from_params(cls, params: Params) -> RegisterInputs:
        """The inputs where params.yaml has the stages write them."""
        v = params.validate_
        decision = Path(params.gate.report).parent / DECISION_FILE
        return cls(decision, params.bench.out, params.engine.out_dir, params.export.out, v.report, v.manifest)


def register(
    model_dir: Path, inputs: RegisterInputs, model: str, params_hash: str, run: RunContext, flow_run_id: str = ""
) -> RegisterResult:
    """Register the gated candidate as a new version of `model` and point `candidate` at it only when its gate
    passed.

    Args:
        params_hash: the hash of the run's effective parameters (`config.params_hash`), kept as a tag.
        run: the tracking server, and the run the registration logs under when the model has no training run.
        flow_run_id: the Prefect flow run that registers it, kept in the alias history.
    """
    from vitops.deploy.engine_meta import read_meta as read_engine_meta
    from vitops.vit.bundle import WEIGHTS_FILE, read_meta

    meta = read_meta(model_dir)
    weights_sha = sha256_file(model_dir / WEIGHTS_FILE)
    decision_file = Path(inputs.decision)
    if not decision_file.is_file():
        raise GateInputError(f"{decision_file}: no gate decision; run `vitops gate` before `vitops register`")
    decision = json.loads(decision_file.read_text(encoding="utf-8"))
    if decision.get("weights_sha256") != weights_sha:
        raise GateInputError(f"{decision_file} judged another model than {model_dir}; rerun `vitops gate`")
    bench = json.loads(Path(inputs.bench).read_text(encoding="utf-8"))
    root = Path(inputs.engine_dir)
    files = engine_files(root)
    serving = {"engines": []}
    engines = []
    for r in bench["results"]:
        path = files.get(r["backend"])
        if path is None or not path.is_file():
            continue
        engines.append(path)
        engine_meta = read_engine_meta(path)
        serving["engines"].append(
            {
                "file": str(path.relative_to(root)),
                "target": engine_meta.target,  # torch-aot-fp16 is a torch-aot engine
                "precision": engine_meta.precision,
                "p50_ms": r["p50_ms"],
                "threads": r.get("threads", 0),
                "device": r.get("device", "cpu"),
                "chosen": r["backend"] == bench.get("target_engine"),  # served first (`vitops build` chose it)
            }
        )
    if bench.get("target_engine"):
        serving["target_engine"] = {"backend": bench["target_engine"], "reason": bench.get("target_reason", "")}
    metrics = decision["metrics"]
    tags = {
        "data_version": str(meta.extra.get("data_version")),
        "git_commit": str(meta.extra.get("git_commit")),
        "params_hash": params_hash,
        "weights_sha256": weights_sha,
        "train_run_id": str(meta.extra.get("mlflow_run_id", "")),
        "gate.passed": str(bool(decision["passed"])).lower(),
        "gate.summary": decision["decision"].get("summary", ""),
        "gate.reasons": "\n".join(
            f"{'PASS' if c['passed'] else 'FAIL'} {c['kpi']}/{c['name']}: {c['reason']}"
            for c in decision["decision"]["checks"]
        ),
        "gate.reference": f"{decision['reference_kind']} {decision.get('reference_version') or ''}".strip(),
        "engines": ",".join(e["target"] + "-" + e["precision"] for e in serving["engines"]),
        **{k: f"{v:.6g}" for k, v in metrics.items() if k.startswith("kpi.")},
    }
    run.configure()
    name = model
    train_run = meta.extra.get("mlflow_run_id")
    with _version_run(train_run, run.parent_run_id) as handle:
        links = {"training run": tracking.run_link(train_run) if train_run and train_run != handle.run_id else ""}
        if train_run:  # the gate logged its report (with the plots) into the training run
            links["KPI report"] = tracking.run_link(train_run, "gate/report.md")
        report = Path(inputs.validation_report)
        if report.is_file():  # the data gate's verdict travels with the version (lineage)
            handle.log_artifact(report, artifact_path="data")
            tags["validation.report"] = f"runs:/{handle.run_id}/data/{report.name}"
            tags["validation.summary"] = _validation_summary(report)
            links["validation report"] = tracking.run_link(handle.run_id, f"data/{report.name}")
            docs = records.keep_data_docs(handle, report)
            links["Data Docs"] = tracking.run_link(handle.run_id, docs) if docs else ""
        manifest = Path(inputs.manifest)
        if manifest.is_file():  # the training data's manifest: the pilot's drift reference on any machine
            handle.log_artifact(manifest, artifact_path="data")
            tags["validation.manifest"] = f"runs:/{handle.run_id}/data/{manifest.name}"
        facts = {
            "model": name,
            "alias": "moved to this version" if decision["passed"] else "not moved: the gate failed",
            "engine": summaries.engine_fact(decision, serving),
            **{k: tags.get(k, "") for k in ("data_version", "git_commit", "params_hash")},
            "validation": tags.get("validation.summary", ""),
        }
        version = packaging.register_version(
            name, handle.run_id, model_dir, Path(inputs.onnx), engines, serving, tags,
            description=summaries.gate_markdown(decision, facts, links),
        )  # fmt: skip
        facts["version"] = version  # the run's description names it
        handle.set_description(summaries.gate_markdown(decision, facts, links))
        handle.set_tags({"registered_model": name, "registered_version": version})
    moved = False
    if decision["passed"]:
        aliases.move_alias(
            name, "candidate", version, expect=None, reason="passed the KPI gate", flow_run_id=flow_run_id
        )
        moved = True
    return RegisterResult(name, version, bool(decision["passed"]), moved, handle.run_id, tags, facts, links)


def _version_run(train_run: str | None, parent_run: str | None) -> Any:
    """The run that owns the version: the retrain's parent run (left open for its flow), else the training run
    (resumed; a new `register` run when the server does not have it)."""
    if parent_run:
        return contextlib.nullcontext(tracking.attach_run(parent_run))
    return tracking.start_or_resume_run("register", train_run, {"stage": "register"}, None)


def _validation_summary(report: Path) -> str:
    data = json.loads(report.read_text(encoding="utf-8"))
    counts = data.get("counts", {})
    verdict = "passed" if data.get("passed") else "FAILED"
    return (
        f"data gate {verdict}: {counts.get('files', '?')} files, {counts.get('usable', '?')} usable, "
        f"{counts.get('rejected', '?')} rejected, {len(data.get('warnings', []))} warnings"
    )
