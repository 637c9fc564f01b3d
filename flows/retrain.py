"""The `retrain` flow: a DVC data version becomes a gated, registered model version, hands-off.

    data version (DVC pull when not local) -> validation gate -> CNN baseline (when the gate compares with it)
    -> fine-tune -> evaluate -> export + engines -> bench -> KPI gate -> register (`candidate` if passed)

`retrain()` reads params.yaml once; `_run()` below is the path of one run: each task is a one-line wrapper of
a stage function, returns a typed result, and the next task takes what it needs from it. Run it with `vitops
retrain` (one process, Prefect's ephemeral API), `vitops serve` (the deployments served from one process,
schedules included), or `prefect deploy --all` + a worker (prefect.yaml). A run whose data version, parameters
and code version match the last successful retrain of that model ends `Skipped` unless `force`; what it
compares is recorded on every retrain's MLflow run, so the decision holds on any machine that shares the
tracking server. One retrain per registered model runs at a time: the flow holds the strict global
concurrency limit `retrain-<model>`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from vitops.flows import tracking
from vitops.flows.benchmark import BenchOutcome, bench
from vitops.flows.config import (
    DEFAULT_PARAMS,
    BenchParams,
    DataParams,
    EngineParams,
    ExportParams,
    Params,
    ValidateParams,
    load_params,
    params_hash,
    with_overrides,
)
from vitops.flows.engines import BuildResult, build
from vitops.flows.evaluation import EvalSettings, EvaluateResult, evaluate
from vitops.flows.gate import GateInputs, GateResult, GateSettings, champion_version, gate
from vitops.flows.records import (
    last_success,
    publish_artifacts,
    record_data_gate_failure,
    record_outcome,
    stage_logs,
)
from vitops.flows.registration import RegisterInputs, RegisterResult, register
from vitops.flows.retries import TRANSIENT
from vitops.flows.settings import Dataset, Recipe, recipe_for, run_context
from vitops.flows.tracking import RunContext
from vitops.flows.training import TrainResult, read_train_result, train
from vitops.flows.validation import ValidateResult, current_data_version, validate

# Named end states: a gate that says no is Failed with its reasons (never a traceback), a skip is Completed.
DATA_GATE_FAILED, KPI_GATE_FAILED, SKIPPED = "Data gate failed", "KPI gate failed", "Skipped"
ENGINE_GATE_FAILED = "Engine gate failed"


@task(cache_policy=NO_CACHE, **TRANSIENT)
def data_version_task(raw: Path, data: DataParams) -> str:
    """The DVC data version of the training data, pulled from the remote when it is not here."""
    return current_data_version(raw, data)


@task(cache_policy=NO_CACHE)
def validate_task(raw: Path, checks: ValidateParams, data: DataParams) -> ValidateResult:
    """The Great Expectations data gate."""
    return validate(raw, checks, data)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def train_task(recipe: Recipe, dataset: Dataset, run: RunContext, nproc_per_node: int, params_file: str) -> TrainResult:
    """Fine-tune the ViT (or train the CNN baseline); several GPUs through torchrun when asked."""
    if nproc_per_node <= 1 or recipe.kind == "baseline":
        return train(recipe, dataset, overwrite=True, run=run)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", "-m", "vitops"]
    parent = ["--parent-run-id", run.parent_run_id] if run.parent_run_id else []
    subprocess.run([*cmd, "--params", params_file, "train", "--overwrite", *parent], check=True)
    return read_train_result(recipe.kind, recipe.out_dir)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def evaluate_task(
    trained: TrainResult, dataset: Dataset, out: Path, settings: EvalSettings, run: RunContext
) -> EvaluateResult:
    """Evaluate on the held-out test split."""
    return evaluate(trained.model_dir, dataset, out, trained.kind, settings, run=run)


@task(cache_policy=NO_CACHE)
def build_task(trained: TrainResult, dataset: Dataset, export: ExportParams, engine: EngineParams) -> BuildResult:
    """ONNX export and the engines of the target, each behind its parity gate."""
    return build(trained.model_dir, dataset, export, engine)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def bench_task(trained: TrainResult, built: BuildResult, settings: BenchParams, run: RunContext) -> BenchOutcome:
    """Batch-1 latency and throughput of every engine."""
    return bench(trained.model_dir, settings.out, settings, built.engine_dir, built.onnx.path, run=run, track=True)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def gate_task(trained: TrainResult, inputs: GateInputs, settings: GateSettings, run: RunContext) -> GateResult:
    """The three-KPI gate against the champion or the baseline."""
    return gate(trained.model_dir, inputs, settings, run)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def register_task(
    trained: TrainResult, inputs: RegisterInputs, model: str, hashed: str, run: RunContext, flow_run_id: str
) -> RegisterResult:
    """Register the candidate; `candidate` points at it only when its gate passed."""
    return register(trained.model_dir, inputs, model, hashed, run, flow_run_id)


def limit_name(model: str) -> str:
    """The global concurrency limit of one registered model's retrains."""
    return "retrain-" + re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit when it is missing (a strict limit that does not exist would fail)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:
                pass  # another retrain created it first


@flow(name="retrain", retries=0, log_prints=True)
def retrain(
    model_name: str | None = None,
    data: str | None = None,
    params_file: str = str(DEFAULT_PARAMS),
    force: bool = False,
    nproc_per_node: int | None = None,
) -> Any:
    """Retrain one registered model on the current data version.

    Args:
        model_name: registered model (default: tracking.registered_model).
        data: the DVC-tracked image folder (default: data.raw_dir).
        params_file: params.yaml to read (relative to the working directory of the run).
        force: retrain even when data, parameters and code match the last successful retrain.
        nproc_per_node: processes (GPUs) for the fine-tune; more than 1 runs it through torchrun
            (default: retrain.nproc_per_node).
    """
    from prefect.concurrency.sync import concurrency

    loaded = load_params(params_file, must_exist=params_file != str(DEFAULT_PARAMS))
    params = with_overrides(loaded, model_name=model_name, data=data)
    limit = limit_name(params.tracking.registered_model)
    ensure_limit(limit)
    slot = concurrency(limit, occupy=1, strict=True, timeout_seconds=params.retrain.wait_timeout_s)
    with stage_logs(), slot:  # the stages' own INFO lines on the run page
        return _run(params, params_file, force, nproc_per_node or params.retrain.nproc_per_node)


def _run(params: Params, params_file: str, force: bool, nproc_per_node: int) -> Any:
    """One retrain, top to bottom: each stage's result feeds the next."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    from vitops.deploy.parity import ParityError
    from vitops.flows.summaries import key_params
    from vitops.flows.versioning import code_version

    name, raw = params.tracking.registered_model, Path(params.data.raw_dir)
    inputs = {
        "data_version": data_version_task(raw, params.data),
        "params_hash": params_hash(params),
        "code_version": code_version(),
    }
    run = run_context(params)
    run.configure()
    previous = last_success(name)
    if previous and previous["inputs"] == inputs and not force:
        message = (
            f"skipped: data {inputs['data_version']}, parameters and code match the last successful retrain of "
            f"{name} (MLflow run {previous['run_id']}, version {previous['version']}); pass force=true to retrain"
        )
        get_run_logger().info(message)
        return Completed(name=SKIPPED, message=message)
    flow_run_id = str(flow_run.id or "")
    tags = {"stage": "retrain", "vitops.model": name, "prefect.flow_run_id": flow_run_id}
    tags |= {f"vitops.{k}": v for k, v in inputs.items()}
    ui = url_for("flow-run", obj_id=flow_run_id) if flow_run_id else None  # None without a known Prefect API
    if ui:
        tags["prefect.flow_run_url"] = ui
    with tracking.start_run(f"retrain-{name}", tags=tags) as parent:
        parent.log_params(key_params(params, inputs))
        run = run_context(params, parent_run_id=parent.run_id)  # every stage's run becomes its child
        checked = validate_task(raw, params.validate_, params.data)
        if not checked.passed:
            reasons = "; ".join(checked.failures) or "see the validation report"
            record_outcome(parent, "data-gate-failed", None)
            record_data_gate_failure(parent, checked)
            publish_artifacts(name, parent.run_id, None, None, checked)
            message = f"data gate failed for {checked.data}: {reasons} ({checked.report_path})"
            return Failed(name=DATA_GATE_FAILED, message=message)
        dataset = checked.dataset
        references, scoring = GateInputs.from_params(params), EvalSettings.from_params(params)
        if _needs_baseline(params):
            baseline = train_task(recipe_for(params, baseline=True), dataset, run, 1, params_file)
            scored = evaluate_task(baseline, dataset, references.baseline_eval, scoring, run)
            references = _with_baseline(references, baseline, scored)
        trained = train_task(recipe_for(params), dataset, run, nproc_per_node, params_file)
        evaluated = evaluate_task(trained, dataset, params.evaluate.out_dir / "vit", scoring, run)
        try:
            built = build_task(trained, dataset, params.export, params.engine)
        except ParityError as err:  # an explicit engine target whose parity gate said no
            record_outcome(parent, "engine-gate-failed", None)
            parent.set_description(f"### Engine gate FAILED: nothing registered\n\n{err}")
            return Failed(name=ENGINE_GATE_FAILED, message=f"{err}; nothing registered, no alias moved")
        benched = bench_task(trained, built, params.bench, run)
        gate_inputs = _with_candidate(references, evaluated, benched, dataset)
        gated = gate_task(trained, gate_inputs, GateSettings.from_params(params), run)
        records = _register_inputs(checked, built, benched, gated)
        registered = register_task(trained, records, name, inputs["params_hash"], run, flow_run_id)
        metrics = json.loads(gated.decision_file.read_text(encoding="utf-8"))["metrics"]
        record_outcome(parent, "passed" if gated.passed else "kpi-gate-failed", registered.version, metrics)
        publish_artifacts(name, parent.run_id, gated, registered, checked)
    summary = f"{name} version {registered.version}: KPI gate {gated.decision.summary()}"
    if not gated.passed:
        reasons = gated.decision.failure_reasons()
        return Failed(name=KPI_GATE_FAILED, message=f"{summary}; registered without `candidate`. {reasons}")
    return Completed(message=f"{summary}; alias candidate -> version {registered.version}")


def _with_baseline(references: GateInputs, baseline: TrainResult, scored: EvaluateResult) -> GateInputs:
    """The gate's references with the baseline this run trained and evaluated."""
    from dataclasses import replace

    return replace(references, baseline_model=baseline.model_dir, baseline_eval=scored.out_dir)


def _with_candidate(
    references: GateInputs, evaluated: EvaluateResult, benched: BenchOutcome, dataset: Dataset
) -> GateInputs:
    """The gate's inputs: this run's candidate evaluation and bench, on this run's data."""
    from dataclasses import replace

    return replace(references, candidate_eval=evaluated.out_dir, bench=benched.out, dataset=dataset)


def _register_inputs(
    checked: ValidateResult, built: BuildResult, benched: BenchOutcome, gated: GateResult
) -> RegisterInputs:
    """What the registration records, from the results of this run's stages."""
    return RegisterInputs(
        decision=gated.decision_file,
        bench=benched.out,
        engine_dir=built.engine_dir,
        onnx=built.onnx.path,
        validation_report=checked.report_path,
        manifest=checked.manifest_path,
    )


def _needs_baseline(params: Params) -> bool:
    """Whether the gate will compare with the CNN baseline (no champion yet, or asked for)."""
    teacher = params.train.teacher or ""
    if params.gate.reference == "baseline" or Path(params.baseline.out_dir).as_posix() in teacher:
        return True  # compared with it, or distilled from it
    if params.gate.reference == "champion":
        return False
    return champion_version(params.tracking.registered_model) is None
