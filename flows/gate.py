"""The KPI gate stage: the three KPIs of a candidate against its reference, the gate's verdict and report.

    gate(model_dir, inputs, settings, run)   accuracy uplift with its interval, latency on the target engine,
                                             monthly TCO; report, kpis.json and decision.json  -> GateResult

The reference is the model the candidate would replace: the registry's `champion`, re-evaluated on today's
test split and re-timed on this machine (its old metrics came from older data and do not count), or, without
a champion, the CNN baseline trained on the same data. Accuracy is compared on the paired predictions of the
same images; latency is the batch-1 figure of the fastest engine the bench timed (the one the pyfunc model
serves with); cost weighs measured training hours and engine throughput with the prices in params.yaml.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, sha256_file
from vitops.flows import registry, tracking
from vitops.flows.config import BenchParams, GateParams, Params
from vitops.flows.evaluation import PREDICTIONS_FILE, PROVENANCE_FILE, EvalSettings, predict_split
from vitops.flows.settings import Dataset, dataset_of, prices_of
from vitops.flows.tracking import RunContext

log = logging.getLogger(__name__)

DECISION_FILE = "decision.json"
ENGINE_PREFIXES = ("onnxruntime", "tensorrt", "openvino", "torch-aot")


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


@dataclass(frozen=True)
class GateInputs:
    """What the gate reads: the candidate's evaluation and bench, and where its references come from."""

    candidate_eval: Path  # the candidate's evaluation folder (predictions.csv, provenance.json)
    bench: Path  # the bench JSON of the candidate's engines
    baseline_model: Path  # the CNN baseline's model folder: the reference without a champion
    baseline_eval: Path  # the baseline's evaluation folder
    dataset: Dataset  # today's data, on whose test split the champion is re-evaluated

    @classmethod
    def from_params(cls, params: Params) -> GateInputs:
        """The inputs where params.yaml has the stages write them."""
        ev = params.evaluate.out_dir
        return cls(ev / "vit", params.bench.out, params.baseline.out_dir / "model", ev / "baseline", dataset_of(params))


@dataclass(frozen=True)
class GateSettings:
    """The gate's thresholds and prices, the timing of the references and the registered model it guards."""

    rules: GateParams
    prices: Any  # deploy.kpi.Prices
    timing: BenchParams
    model: str
    scoring: EvalSettings = EvalSettings()  # the champion's re-evaluation reads the test split like `evaluate`

    @classmethod
    def from_params(cls, params: Params) -> GateSettings:
        """The settings of params.yaml; a missing `cost` section is a configuration error."""
        return cls(
            params.gate,
            prices_of(params),
            params.bench,
            params.tracking.registered_model,
            EvalSettings.from_params(params),
        )


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


def time_backend(timing: BenchParams, name: str, factory: Any, img_size: int) -> Any:
    """Batch-1 latency and throughput of one reference backend, timed now with the bench settings."""
    import numpy as np

    from vitops.deploy.kpi import Latency
    from vitops.deploy.latency import bench_backends

    b = timing
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


def _baseline_reference(inputs: GateInputs, settings: GateSettings) -> tuple[Any, Any, None]:
    from vitops.deploy.kpi import ModelKpis, cost_of
    from vitops.deploy.latency import torch_runner
    from vitops.vit.bundle import load_bundle

    model_dir = inputs.baseline_model
    preds = read_predictions(inputs.baseline_eval / PREDICTIONS_FILE)
    model, meta = load_bundle(model_dir)
    latency = time_backend(settings.timing, "torch-eager", lambda: torch_runner(model, "cpu"), meta.img_size)
    kpis = ModelKpis(
        label=f"baseline {meta.model}",
        top1=float(preds["correct"].mean()),
        latency=latency,
        cost=cost_of(train_hours(meta, str(model_dir)), latency.throughput_ips, settings.prices),
    )
    return kpis, preds, None


def _champion_reference(inputs: GateInputs, settings: GateSettings, champion: Any, work: Path) -> tuple[Any, Any, str]:
    """Re-evaluate the champion on today's test split and re-time its serving engine on this machine."""
    import torch

    from vitops.deploy.kpi import ModelKpis, cost_of
    from vitops.deploy.latency import ort_runner
    from vitops.vit.bundle import load_bundle

    s = settings
    model_dir = tracking.download_model(f"models:/{s.model}/{champion.version}", work)
    local = work
    model, meta = load_bundle(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probs, labels, paths = predict_split(
        model.to(device), meta, inputs.dataset, "test", device, s.scoring.batch_size, s.scoring.workers
    )
    import pandas as pd

    preds = pd.DataFrame({"path": paths, "correct": (probs.argmax(axis=1) == labels).astype(int)})
    engines = sorted(p for p in local.rglob("*.onnx") if p.name != "model.onnx" and Path(f"{p}.json").is_file())
    if engines:
        timed = [
            time_backend(s.timing, f"onnxruntime-{p.stem}", lambda p=p: ort_runner(p), meta.img_size) for p in engines
        ]
        latency = min(timed, key=lambda lat: lat.p50_ms)
    else:
        from vitops.deploy.latency import torch_runner

        latency = time_backend(s.timing, "torch-eager", lambda: torch_runner(model.cpu(), "cpu"), meta.img_size)
    hours = champion.tags.get("kpi.train_hours")
    kpis = ModelKpis(
        label=f"champion v{champion.version}",
        top1=float(preds["correct"].mean()),
        latency=latency,
        cost=cost_of(
            float(hours) if hours else train_hours(meta, f"champion v{champion.version}"),
            latency.throughput_ips,
            s.prices,
        ),
    )
    return kpis, preds, str(champion.version)


def champion_version(model: str) -> Any:
    """The registry's champion version, or None when the model or the alias does not exist yet."""
    try:
        return registry.version_info(model, "champion")
    except registry.RegistryError as err:
        log.info("no champion to compare with (%s)", err)
        return None


def gate(
    model_dir: Path, inputs: GateInputs, settings: GateSettings, run: RunContext, track: bool = True
) -> GateResult:
    """The three-KPI gate of a candidate against the champion (re-evaluated on today's test split) or the CNN
    baseline: accuracy uplift with its interval, latency on the target engine, monthly TCO. Writes the report
    and `decision.json` beside it; with `track`, logs them to the candidate's training run."""
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
    from vitops.deploy.kpi_report import format_kpi_table, markdown_kpi_table, write_report
    from vitops.vit.bundle import WEIGHTS_FILE, read_meta

    prices = settings.prices
    g = settings.rules
    meta = read_meta(model_dir)
    weights_sha = sha256_file(model_dir / WEIGHTS_FILE)
    preds = read_predictions(inputs.candidate_eval / PREDICTIONS_FILE)
    _same_model(inputs.candidate_eval / PROVENANCE_FILE, weights_sha, "vitops evaluate")
    latency = target_latency(Path(inputs.bench), weights_sha)
    candidate = ModelKpis(
        label="candidate",
        top1=float(preds["correct"].mean()),
        latency=latency,
        cost=cost_of(train_hours(meta, str(model_dir)), latency.throughput_ips, prices),
    )
    run.configure()
    champion = champion_version(settings.model) if g.reference in ("auto", "champion") else None
    if g.reference == "champion" and champion is None:
        raise GateInputError(
            f"gate.reference is champion but {settings.model} has no champion; use reference: auto or baseline"
        )
    with tempfile.TemporaryDirectory(prefix="vitops-champion-") as work:
        if champion is not None:
            reference, ref_preds, ref_version = _champion_reference(inputs, settings, champion, Path(work))
            kind = "champion"
        else:
            reference, ref_preds, ref_version = _baseline_reference(inputs, settings)
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
        "model": settings.model,
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
            "kpi_table_markdown": markdown_kpi_table(candidate, reference, uplift, decision),  # for descriptions
        },
    )
    run_id = None
    if track:
        tags = {"stage": "gate", "gate.passed": str(decision.passed).lower(), "gate.reference": context["reference"]}
        train_run = meta.extra.get("mlflow_run_id")
        with tracking.start_or_resume_run("gate", train_run, tags, run.parent_run_id) as handle:
            handle.set_tags(tags | {"gate.summary": decision.summary()})
            handle.log_metrics(kpi_metrics(candidate, reference, uplift))
            for path in [*report_files, decision_file]:
                handle.log_artifact(path, artifact_path="gate")
            run_id = handle.run_id
    return GateResult(
        decision.passed, decision, uplift, candidate, reference, kind, ref_version, table, report_files,
        decision_file, run_id,
    )  # fmt: skip


def _cross_check(checks: list[Any], uplift: Any, candidate: Any) -> None:
    """Hold the plain-threshold checks to MLflow's own `validate_evaluation_results` as well; a check passes only
    when both agree (they can differ only at a rounding edge, which is then failed and logged)."""

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
