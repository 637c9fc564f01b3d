"""Bodies of the `gate` and `register` stages: the three KPIs of a candidate against its reference, the gate's
verdict and report, and the registry version that records them.

The reference is the model the candidate would replace: the registry's `champion`, re-evaluated on today's
test split and re-timed on this machine (its old metrics came from older data and do not count), or, without
a champion, the CNN baseline trained on the same data. Accuracy is compared on the paired predictions of the
same images; latency is the batch-1 figure of the fastest engine the bench timed (the one the pyfunc model
serves with); cost weighs measured training hours and engine throughput with the prices in params.yaml.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, sha256_file
from vitops.flows import aliases, packaging, registry
from vitops.flows.config import Params, ParamsError

log = logging.getLogger(__name__)

DECISION_FILE = "decision.json"
ENGINE_PREFIXES = ("onnxruntime", "tensorrt", "openvino")


class GateInputError(ValueError):
    """The gate's inputs are missing or belong to another model or test split; the message says what to rerun."""


@dataclass
class GateResult:
    passed: bool
    decision: Any  # deploy.kpi.GateDecision
    uplift: Any  # deploy.kpi.Uplift
    candidate: Any  # deploy.kpi.ModelKpis
    reference: Any  # deploy.kpi.ModelKpis
    reference_kind: str  # champion | baseline
    reference_version: str | None
    table: str
    report: list[Path]
    decision_file: Path
    run_id: str | None


@dataclass
class RegisterResult:
    name: str
    version: str
    gate_passed: bool
    candidate: bool  # whether `candidate` now points at this version
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)


def prices_of(params: Params) -> Any:
    """`cost` of params.yaml as `deploy.kpi.Prices`; a missing section is a configuration error."""
    from vitops.deploy.kpi import Prices

    if params.cost is None:
        raise ParamsError(
            "params.yaml has no `cost` section: the gate needs prices (train_price_per_hour, serve_price_per_hour, "
            "utilisation, retrains_per_month, images_per_month, upkeep_per_month); copy the example from the README"
        )
    return Prices(**params.cost.model_dump())


def read_predictions(path: Path) -> Any:
    """The per-image predictions `vitops evaluate` wrote."""
    import pandas as pd

    if not path.is_file():
        raise GateInputError(f"{path}: no predictions; run `vitops evaluate` for this model first")
    return pd.read_csv(path)


def paired(candidate: Any, reference: Any, what: str) -> tuple[Any, Any]:
    """Correctness of both models on the same images, in the same order."""
    c, r = set(candidate["path"]), set(reference["path"])
    if c != r:
        raise GateInputError(
            f"the candidate and the {what} were evaluated on different test splits ({len(c - r)} images only in the "
            f"candidate's, {len(r - c)} only in the {what}'s); evaluate both on the current data version"
        )
    merged = candidate.merge(reference, on="path", suffixes=("_c", "_r"))
    return merged["correct_c"].to_numpy(bool), merged["correct_r"].to_numpy(bool)


def target_latency(bench_json: Path, weights_sha: str) -> Any:
    """The engine the version serves with, as `deploy.kpi.Latency`: the bench's target engine (the one `vitops
    build` chose, `selection.json`), else the fastest engine the bench timed."""
    from vitops.deploy.kpi import Latency

    if not bench_json.is_file():
        raise GateInputError(f"{bench_json}: no benchmark; run `vitops build` and `vitops bench` first")
    report = json.loads(bench_json.read_text(encoding="utf-8"))
    if report.get("model", {}).get("weights_sha256") not in (None, weights_sha):
        raise GateInputError(f"{bench_json} benchmarks another model; rerun `vitops bench` for this one")
    engines = [r for r in report["results"] if r["backend"].startswith(ENGINE_PREFIXES)]
    if not engines:
        raise GateInputError(f"{bench_json}: no engine was timed; run `vitops build`, then `vitops bench`")
    chosen = [r for r in engines if r["backend"] == report.get("target_engine")]
    best = chosen[0] if chosen else min(engines, key=lambda r: r["p50_ms"])
    return Latency(
        engine=best["backend"],
        p50_ms=best["p50_ms"],
        p95_ms=best["p95_ms"],
        p99_ms=best["p99_ms"],
        throughput_ips=best["throughput_ips"],
        samples_ms=list(best.get("samples_ms") or []),
    )


def time_backend(params: Params, name: str, factory: Any, img_size: int) -> Any:
    """Batch-1 latency and throughput of one reference backend, timed now with the bench settings."""
    import numpy as np

    from vitops.deploy.kpi import Latency
    from vitops.deploy.latency import bench_backends

    b = params.bench
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, img_size, img_size), dtype=np.float32)
    batch = rng.standard_normal((b.large_batch, 3, img_size, img_size), dtype=np.float32)
    (r,) = bench_backends({name: factory}, image, batch, b.warmup, b.iters)
    return Latency(name, r.p50_ms, r.p95_ms, r.p99_ms, r.throughput_ips, list(r.samples_ms or []))


def _same_model(provenance: Path, weights_sha: str, command: str) -> None:
    if not provenance.is_file() or json.loads(provenance.read_text()).get("weights_sha256") != weights_sha:
        raise GateInputError(f"{provenance.parent} holds results of another model (or none); rerun `{command}`")


def train_hours(meta: Any, what: str) -> float:
    """Measured device hours of the training run that made a model folder."""
    hours = meta.extra.get("train_device_hours")
    if hours is None:
        raise GateInputError(f"{what}: its model.json records no training time; retrain it with this vitops")
    return float(hours)


def _baseline_reference(params: Params, prices: Any) -> tuple[Any, Any, None]:
    from vitops.deploy.kpi import ModelKpis, cost_of
    from vitops.deploy.latency import torch_runner
    from vitops.vit.bundle import load_bundle

    model_dir = params.baseline.out_dir / "model"
    preds = read_predictions(params.evaluate.out_dir / "baseline" / "predictions.csv")
    model, meta = load_bundle(model_dir)
    latency = time_backend(params, "torch-eager", lambda: torch_runner(model, "cpu"), meta.img_size)
    kpis = ModelKpis(
        label=f"baseline {meta.model}",
        top1=float(preds["correct"].mean()),
        latency=latency,
        cost=cost_of(train_hours(meta, str(model_dir)), latency.throughput_ips, prices),
    )
    return kpis, preds, None


def _champion_reference(params: Params, champion: Any, work: Path, prices: Any) -> tuple[Any, Any, str]:
    """Re-evaluate the champion on today's test split and re-time its serving engine on this machine."""
    import torch

    from vitops.deploy.kpi import ModelKpis, cost_of
    from vitops.deploy.latency import ort_runner
    from vitops.flows import tracking
    from vitops.flows.stages import predict_split
    from vitops.vit.bundle import load_bundle

    name = params.tracking.registered_model
    model_dir = tracking.download_model(f"models:/{name}/{champion.version}", work)
    local = work
    model, meta = load_bundle(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probs, labels, paths = predict_split(params, model.to(device), meta, "test", Path(params.data.raw_dir), device)
    import pandas as pd

    preds = pd.DataFrame({"path": paths, "correct": (probs.argmax(axis=1) == labels).astype(int)})
    engines = sorted(p for p in local.rglob("*.onnx") if p.name != "model.onnx" and Path(f"{p}.json").is_file())
    if engines:
        timed = [
            time_backend(params, f"onnxruntime-{p.stem}", lambda p=p: ort_runner(p), meta.img_size) for p in engines
        ]
        latency = min(timed, key=lambda lat: lat.p50_ms)
    else:
        from vitops.deploy.latency import torch_runner

        latency = time_backend(params, "torch-eager", lambda: torch_runner(model.cpu(), "cpu"), meta.img_size)
    hours = champion.tags.get("kpi.train_hours")
    kpis = ModelKpis(
        label=f"champion v{champion.version}",
        top1=float(preds["correct"].mean()),
        latency=latency,
        cost=cost_of(
            float(hours) if hours else train_hours(meta, f"champion v{champion.version}"),
            latency.throughput_ips,
            prices,
        ),
    )
    return kpis, preds, str(champion.version)


def champion_version(params: Params) -> Any:
    """The registry's champion version, or None when the model or the alias does not exist yet."""
    try:
        return registry.version_info(params.tracking.registered_model, "champion")
    except registry.RegistryError as err:
        log.info("no champion to compare with (%s)", err)
        return None


def run_gate(params: Params, model_dir: Path, track: bool) -> GateResult:
    """Compute the KPIs, decide, write the report and decision.json, and log them to the candidate's run."""
    import tempfile

    from vitops.deploy.kpi import (
        GateRules,
        ModelKpis,
        check_accuracy,
        check_cost,
        check_latency,
        cost_of,
        decide,
        kpi_metrics,
        paired_uplift,
    )
    from vitops.deploy.kpi_report import format_kpi_table, write_report
    from vitops.flows import tracking
    from vitops.vit.bundle import WEIGHTS_FILE, read_meta

    prices = prices_of(params)
    g = params.gate
    meta = read_meta(model_dir)
    weights_sha = sha256_file(model_dir / WEIGHTS_FILE)
    preds = read_predictions(params.evaluate.out_dir / "vit" / "predictions.csv")
    _same_model(params.evaluate.out_dir / "vit" / "provenance.json", weights_sha, "vitops evaluate")
    latency = target_latency(Path(params.bench.out), weights_sha)
    candidate = ModelKpis(
        label="candidate",
        top1=float(preds["correct"].mean()),
        latency=latency,
        cost=cost_of(train_hours(meta, str(model_dir)), latency.throughput_ips, prices),
    )
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    champion = champion_version(params) if g.reference in ("auto", "champion") else None
    if g.reference == "champion" and champion is None:
        raise GateInputError(
            f"gate.reference is champion but {params.tracking.registered_model} has no champion; "
            "use reference: auto or baseline"
        )
    with tempfile.TemporaryDirectory(prefix="vitops-champion-") as work:
        if champion is not None:
            reference, ref_preds, ref_version = _champion_reference(params, champion, Path(work), prices)
            kind = "champion"
        else:
            reference, ref_preds, ref_version = _baseline_reference(params, prices)
            kind = "baseline"
    cand_ok, ref_ok = paired(preds, ref_preds, kind)
    uplift = paired_uplift(cand_ok, ref_ok, confidence=g.confidence, samples=g.bootstrap_samples, seed=0)
    rules = GateRules(g.min_uplift_points, g.require_interval, g.max_p95_ms, g.max_monthly_tco, g.max_tco_increase)
    checks = [
        *check_accuracy(uplift, rules, reference.label),
        *check_latency(candidate, rules, reference),
        *check_cost(candidate, reference, rules),
    ]
    _cross_check(checks, uplift, candidate)
    decision = decide(checks)
    table = format_kpi_table(candidate, reference, uplift, decision)
    context = {
        "model": params.tracking.registered_model,
        "candidate": str(model_dir),
        "reference": f"{kind} {ref_version}" if ref_version else kind,
        "data version": str(meta.extra.get("data_version")),
        "git commit": str(meta.extra.get("git_commit")),
        "test images": str(uplift.n),
    }
    report_files = write_report(Path(g.report), candidate, reference, uplift, decision, context)
    atomic_write_json(Path(g.report).parent / "kpis.json", kpi_metrics(candidate, reference, uplift))  # DVC metrics
    table_file = Path(g.report).with_suffix(".txt")
    table_file.write_text(table + "\n", encoding="utf-8")
    decision_file = atomic_write_json(
        Path(g.report).parent / DECISION_FILE,
        {
            "passed": decision.passed,
            "decision": decision.as_dict(),
            "uplift": uplift.as_dict(),
            "candidate": _kpis_dict(candidate),
            "reference": _kpis_dict(reference),
            "reference_kind": kind,
            "reference_version": ref_version,
            "weights_sha256": weights_sha,
            "metrics": kpi_metrics(candidate, reference, uplift),
        },
    )
    run_id = None
    if track:
        tags = {"stage": "gate", "gate.passed": str(decision.passed).lower(), "gate.reference": context["reference"]}
        with tracking.start_or_resume_run("gate", run_id=meta.extra.get("mlflow_run_id"), tags=tags) as run:
            run.set_tags(tags | {"gate.summary": decision.summary()})
            run.log_metrics(kpi_metrics(candidate, reference, uplift))
            for path in [*report_files, decision_file]:
                run.log_artifact(path, artifact_path="gate")
            run_id = run.run_id
    return GateResult(
        decision.passed, decision, uplift, candidate, reference, kind, ref_version, table, report_files,
        decision_file, run_id,
    )  # fmt: skip


def _cross_check(checks: list[Any], uplift: Any, candidate: Any) -> None:
    """Hold the plain-threshold checks to MLflow's own `validate_evaluation_results` as well; a check passes only
    when both agree (they can differ only at a rounding edge, which is then failed and logged)."""
    from vitops.flows import tracking

    tco = candidate.cost.monthly_tco
    values = {
        "uplift_estimate": uplift.points,
        "p95_ms": candidate.latency.p95_ms,
        "monthly_tco": tco,
        "tco_increase": tco,
    }
    plain = {c.name: c for c in checks if c.name in values}
    verdicts = tracking.threshold_verdicts(
        {name: values[name] for name in plain},
        # the same 1e-9 tolerance as deploy.kpi, so a count-exact tie with the threshold passes both
        {
            name: (c.threshold + (-1e-9 if name == "uplift_estimate" else 1e-9), name == "uplift_estimate")
            for name, c in plain.items()
        },
    )
    for name, check in plain.items():
        if check.passed and not verdicts[name]:
            log.warning("%s: MLflow's validation disagrees at the threshold; failing the check", name)
            check.passed = False
            check.reason += " (MLflow's validate_evaluation_results failed it at the threshold)"


def _kpis_dict(kpis: Any) -> dict[str, Any]:
    latency = {k: v for k, v in vars(kpis.latency).items() if k != "samples_ms"}
    return {"label": kpis.label, "top1": kpis.top1, "latency": latency, "cost": kpis.cost.as_dict()}


def _validation_summary(report: Path) -> str:
    data = json.loads(report.read_text(encoding="utf-8"))
    counts = data.get("counts", {})
    verdict = "passed" if data.get("passed") else "FAILED"
    return (
        f"data gate {verdict}: {counts.get('files', '?')} files, {counts.get('usable', '?')} usable, "
        f"{counts.get('rejected', '?')} rejected, {len(data.get('warnings', []))} warnings"
    )


def params_hash(params: Params) -> str:
    """sha256 of the effective parameters (after defaults), so two runs with the same settings match."""
    import hashlib

    text = params.model_dump_json(by_alias=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_register(params: Params, model_dir: Path, flow_run_id: str) -> RegisterResult:
    """Register the gated candidate; point `candidate` at it only when its gate passed."""
    from vitops.deploy.engine_meta import read_meta as read_engine_meta
    from vitops.flows import tracking
    from vitops.flows.engines import engine_files
    from vitops.vit.bundle import WEIGHTS_FILE, read_meta

    meta = read_meta(model_dir)
    weights_sha = sha256_file(model_dir / WEIGHTS_FILE)
    decision_file = Path(params.gate.report).parent / DECISION_FILE
    if not decision_file.is_file():
        raise GateInputError(f"{decision_file}: no gate decision; run `vitops gate` before `vitops register`")
    decision = json.loads(decision_file.read_text(encoding="utf-8"))
    if decision.get("weights_sha256") != weights_sha:
        raise GateInputError(f"{decision_file} judged another model than {model_dir}; rerun `vitops gate`")
    bench = json.loads(Path(params.bench.out).read_text(encoding="utf-8"))
    files = engine_files(params)
    root = Path(params.engine.out_dir)
    serving = {"engines": []}
    engines = []
    for r in bench["results"]:
        path = files.get(r["backend"])
        if path is None or not path.is_file():
            continue
        engines.append(path)
        serving["engines"].append(
            {
                "file": str(path.relative_to(root)),
                "target": r["backend"].split("-")[0],
                "precision": read_engine_meta(path).precision,
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
        "params_hash": params_hash(params),
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
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    name = params.tracking.registered_model
    run_id = meta.extra.get("mlflow_run_id")
    with tracking.start_or_resume_run("register", run_id=run_id, tags={"stage": "register"}) as run:
        report = Path(params.validate_.report)
        if report.is_file():  # the data gate's verdict travels with the version (lineage)
            run.log_artifact(report, artifact_path="data")
            tags["validation.report"] = f"runs:/{run.run_id}/data/{report.name}"
            tags["validation.summary"] = _validation_summary(report)
        manifest = Path(params.validate_.manifest)
        if manifest.is_file():  # the training data's manifest: the pilot's drift reference on any machine
            run.log_artifact(manifest, artifact_path="data")
            tags["validation.manifest"] = f"runs:/{run.run_id}/data/{manifest.name}"
        version = packaging.register_version(
            name,
            run.run_id,
            model_dir,
            Path(params.export.out),
            engines,
            serving,
            tags,
            description=decision["decision"].get("summary", ""),
        )
        run.set_tags({"registered_model": name, "registered_version": version})
    moved = False
    if decision["passed"]:
        aliases.move_alias(
            name, "candidate", version, expect=None, reason="passed the KPI gate", flow_run_id=flow_run_id
        )
        moved = True
    return RegisterResult(name, version, bool(decision["passed"]), moved, run.run_id, tags)
