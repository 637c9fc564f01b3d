"""The `retrain` flow: a DVC data version becomes a gated, registered model version, hands-off.

    data version (DVC pull when not local) -> validation gate -> CNN baseline (when the gate compares with it)
    -> fine-tune -> evaluate -> export + engines -> bench -> KPI gate -> register (`candidate` if passed)

Each task is a thin wrapper of a stage function of `flows.stages`. Run it with `vitops retrain` (one process,
Prefect's ephemeral API), `vitops serve` (the deployments served from one process, schedules included), or
`prefect deploy --all` + a worker (prefect.yaml). A run whose data version, parameters and code version match
the last successful retrain of that model ends `Skipped` unless `force`; what it compares is recorded on every
retrain's MLflow run, so the decision holds on any machine that shares the tracking server. One retrain per
registered model runs at a time: the flow holds the strict global concurrency limit `retrain-<model>`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from vitops.flows import stages
from vitops.flows.config import DEFAULT_PARAMS, Params, load_params
from vitops.flows.retries import TRANSIENT
from vitops.flows.retries import is_transient as is_transient  # tests and callers import it from here

# Named end states: a gate that says no is Failed with its reasons (never a traceback), a skip is Completed.
DATA_GATE_FAILED, KPI_GATE_FAILED, SKIPPED = "Data gate failed", "KPI gate failed", "Skipped"
ENGINE_GATE_FAILED = "Engine gate failed"


@task(cache_policy=NO_CACHE, **TRANSIENT)
def data_version_task(params: Params) -> str:
    """The DVC data version of the training data, pulled from the remote when it is not here."""
    from vitops.flows.versioning import data_version, pull_data

    raw = Path(params.data.raw_dir)
    if not raw.is_dir() or not any(raw.iterdir()):
        return pull_data(raw, params.data.remote, params.data.remote_name) or "untracked"
    return data_version(raw) or "untracked"


@task(cache_policy=NO_CACHE)
def validate_task(params: Params) -> stages.ValidateResult:
    """The Great Expectations data gate."""
    return stages.validate(params)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def train_task(params: Params, baseline: bool, nproc_per_node: int, params_file: str) -> Any:
    """Fine-tune the ViT (or train the CNN baseline); several GPUs through torchrun when asked."""
    if nproc_per_node <= 1 or baseline:
        return stages.train(params, baseline=baseline, overwrite=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", "-m", "vitops"]
    subprocess.run([*cmd, "--params", params_file, "train", "--overwrite"], check=True)
    return Path(params.train.out_dir) / "model"


@task(cache_policy=NO_CACHE, **TRANSIENT)
def evaluate_task(params: Params, baseline: bool) -> stages.EvaluateResult:
    """Evaluate on the held-out test split."""
    return stages.evaluate(params, baseline=baseline)


@task(cache_policy=NO_CACHE)
def build_task(params: Params) -> stages.BuildResult:
    """ONNX export and the engines of the target, each behind its parity gate."""
    return stages.build(params)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def bench_task(params: Params) -> stages.BenchOutcome:
    """Batch-1 latency and throughput of every engine."""
    return stages.bench(params, track=True)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def gate_task(params: Params) -> Any:
    """The three-KPI gate against the champion or the baseline."""
    return stages.gate(params)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def register_task(params: Params, flow_run_id: str) -> Any:
    """Register the candidate; `candidate` points at it only when its gate passed."""
    return stages.register(params, flow_run_id=flow_run_id)


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

    params = load_params(params_file, must_exist=params_file != str(DEFAULT_PARAMS))
    if model_name:
        params.tracking.registered_model = model_name
    if data:
        params.data.raw_dir = Path(data)
    name = params.tracking.registered_model
    limit = limit_name(name)
    ensure_limit(limit)
    with concurrency(limit, occupy=1, strict=True, timeout_seconds=params.retrain.wait_timeout_s):
        return _retrain(params, params_file, force, nproc_per_node or params.retrain.nproc_per_node)


def _retrain(params: Params, params_file: str, force: bool, nproc_per_node: int) -> Any:
    from prefect.runtime import flow_run

    from vitops.deploy.parity import ParityError
    from vitops.flows import tracking
    from vitops.flows.kpis import params_hash
    from vitops.flows.records import last_success, publish_artifacts, record_outcome
    from vitops.flows.versioning import code_version

    logger = get_run_logger()
    name = params.tracking.registered_model
    inputs = {
        "data_version": data_version_task(params),
        "params_hash": params_hash(params),
        "code_version": code_version(),
    }
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    previous = last_success(name)
    if previous and previous["inputs"] == inputs and not force:
        message = (
            f"skipped: data {inputs['data_version']}, parameters and code match the last successful retrain of "
            f"{name} (MLflow run {previous['run_id']}, version {previous['version']}); pass force=true to retrain"
        )
        logger.info(message)
        return Completed(name=SKIPPED, message=message)
    run_id = str(flow_run.id or "")
    tags = {"stage": "retrain", "vitops.model": name, "prefect.flow_run_id": run_id}
    tags |= {f"vitops.{k}": v for k, v in inputs.items()}
    if flow_run.ui_url:
        tags["prefect.flow_run_url"] = flow_run.ui_url
    with tracking.start_run(f"retrain-{name}", tags=tags) as parent:
        os.environ["VITOPS_PARENT_RUN_ID"] = parent.run_id  # stage runs become its children, in every thread
        try:
            checked = validate_task(params)
            if not checked.passed:
                reasons = "; ".join(checked.failures) or "see the validation report"
                record_outcome(parent, "data-gate-failed", None)
                publish_artifacts(name, parent.run_id, None, None, checked)
                message = f"data gate failed for {checked.data}: {reasons} ({checked.report_path})"
                return Failed(name=DATA_GATE_FAILED, message=message)
            if _needs_baseline(params):
                train_task(params, True, 1, params_file)
                evaluate_task(params, True)
            train_task(params, False, nproc_per_node, params_file)
            evaluate_task(params, False)
            try:
                build_task(params)
            except ParityError as err:  # an explicit engine target whose parity gate said no
                record_outcome(parent, "engine-gate-failed", None)
                return Failed(name=ENGINE_GATE_FAILED, message=f"{err}; nothing registered, no alias moved")
            bench_task(params)
            gate = gate_task(params)
            registered = register_task(params, run_id)
        finally:
            os.environ.pop("VITOPS_PARENT_RUN_ID", None)
        record_outcome(parent, "passed" if gate.passed else "kpi-gate-failed", registered.version)
        publish_artifacts(name, parent.run_id, gate, registered, checked)
    summary = f"{name} version {registered.version}: KPI gate {gate.decision.summary()}"
    if not gate.passed:
        failed = [c.reason for c in gate.decision.checks if not c.passed]
        return Failed(name=KPI_GATE_FAILED, message=f"{summary}; registered without `candidate`. " + " ".join(failed))
    return Completed(message=f"{summary}; alias candidate -> version {registered.version}")


def _needs_baseline(params: Params) -> bool:
    """Whether the gate will compare with the CNN baseline (no champion yet, or asked for)."""
    teacher = params.train.teacher or ""
    if params.gate.reference == "baseline" or Path(params.baseline.out_dir).as_posix() in teacher:
        return True  # compared with it, or distilled from it
    if params.gate.reference == "champion":
        return False
    from vitops.flows.kpis import champion_version

    return champion_version(params) is None
