"""The `pilot` flow: a candidate proves itself on new images from the site before it replaces the champion.

    prefect deployment run 'pilot/staged' --param stage='"shadow"'     # champion serves, candidate recorded
    prefect deployment run 'pilot/staged' --param stage='"canary"'     # a hash share to the candidate, guardrails
    prefect deployment run 'pilot/staged' --param stage='"promote"'    # checks, then pauses for an approval
    vitops approve FLOW_RUN_ID --approver NAME [--reject] [--comment TEXT]
    prefect deployment run 'pilot/staged' --param stage='"rollback"' --param reason='"..."'

Each stage is one run. The batch goes through the data gate first: rejected files are listed and never scored,
and no file of the batch is changed. `shadow` gives the candidate the alias `pilot`; a canary guardrail breach
takes it away and ends the run Failed; `promote` asks a person (Prefect's `pause_flow_run` with an `Approval`
input), writes the decision onto the version's tags, reads it back, and only then moves `champion`, expecting
the champion it saw before it paused. A rejection, a timeout, a refused check or a lost race leave every alias
as it was. Nothing here moves `champion` without that approval, except `rollback`, which puts back the champion
before, from the registry's history. The stage bodies are in `flows/pilot_stages.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from prefect.states import Completed, Failed
from pydantic import Field

from vitops.common.files import utc_now
from vitops.flows import aliases, registry
from vitops.flows import pilot_stages as ps
from vitops.flows.config import DEFAULT_PARAMS, Params, load_params
from vitops.flows.retrain import TRANSIENT

# Named end states: bad news is Failed with its reasons, never a traceback.
BATCH_REJECTED, REFUSED, BREACH = "Batch rejected", "Refused", "Guardrail breach"
INCONCLUSIVE, REJECTED, TIMED_OUT, CONFLICT = "Canary inconclusive", "Rejected", "Approval timed out", "Conflict"


class Approval(RunInput):
    """What a person answers to a paused `promote` (the UI's resume form, or `vitops approve`)."""

    approve: bool = Field(False, description="tick to promote the candidate to champion; leave unticked to reject")
    approver: str = Field(..., min_length=1, description="your name, kept with the version and in the history")
    comment: str = Field("", description="why; kept with the decision")


@task(cache_policy=NO_CACHE, **TRANSIENT)
def versions_task(params: Params, version: str) -> ps.Versions:
    """The candidate, the champion and the pilot as the registry has them now."""
    return ps.resolve_versions(params, version)


@task(cache_policy=NO_CACHE)
def batch_task(params: Params, batch: Path, versions: ps.Versions, out: Path) -> ps.BatchCheck:
    """The batch's data gate: rejected files are listed, never scored; nothing is changed."""
    return ps.check_batch(params, batch, versions, out)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def shadow_task(params: Params, versions: ps.Versions, batch: ps.BatchCheck, out: Path, run_id: str) -> Any:
    """Both models answer every image; only the champion's answers count."""
    return ps.shadow(params, versions, batch, out, run_id)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def canary_task(params: Params, versions: ps.Versions, batch: ps.BatchCheck, out: Path, run_id: str) -> Any:
    """A content-hash share to the candidate, the rest to the champion, then the guardrails."""
    return ps.canary(params, versions, batch, out, run_id)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def move_task(
    name: str, alias: str, version: str | None, expect: str | None, reason: str, run_id: str, override: bool = False
) -> Any:
    """A checked, recorded alias move."""
    return aliases.move_alias(
        name, alias, version, expect=expect or "none", reason=reason, flow_run_id=run_id, override_gate=override
    )


@flow(name="pilot", retries=0, log_prints=True)
def pilot(
    stage: Literal["shadow", "canary", "promote", "rollback"],
    model_name: str | None = None,
    version: str = "candidate",
    batch: str | None = None,
    params_file: str = str(DEFAULT_PARAMS),
    skip: list[str] | None = None,
    reason: str = "",
) -> Any:
    """One stage of a staged pilot of a registered model.

    Args:
        stage: shadow, canary, promote or rollback.
        model_name: registered model (default: tracking.registered_model).
        version: the candidate: an alias (`candidate`, `pilot`) or a version number.
        batch: folder of new images, unlabelled or in class subfolders (default: pilot.batch).
        params_file: params.yaml to read (relative to the working directory of the run).
        skip: for promote, requirements skipped on purpose (`gate`, `shadow`, `canary`); needs `reason`.
        reason: why (a skip, a rollback); kept in the records and the registry history.
    """
    from prefect.runtime import flow_run

    params = load_params(params_file, must_exist=params_file != str(DEFAULT_PARAMS))
    if model_name:
        params.tracking.registered_model = model_name
    run_id = str(flow_run.id or "")
    if stage == ps.ROLLBACK:
        return _rollback(params, reason, run_id)
    versions = versions_task(params, version)
    if versions.champion == versions.candidate:
        return Failed(name=REFUSED, message=f"version {versions.candidate} of {versions.name} is the champion already: "
                      "nothing to pilot; name the candidate with version=...")  # fmt: skip
    if stage == ps.PROMOTE:
        return _promote(params, versions, list(skip or []), reason, run_id)
    tags = registry.version_info(versions.name, versions.candidate).tags
    refusal = ps.pilot_refusal(versions, tags, list(skip or []), reason)
    if refusal:
        return Failed(name=REFUSED, message=refusal)
    out = Path(params.pilot.out_dir) / stage
    checked = batch_task(params, Path(batch or params.pilot.batch), versions, out)
    if not checked.passed:
        message = f"batch {checked.root} failed its data gate: " + "; ".join(checked.failures)
        _record(params, stage, versions, "batch-rejected", run_id, message, None, [checked.report_path])
        return Failed(name=BATCH_REJECTED, message=message + f" ({checked.report_path})")
    if stage == ps.SHADOW:
        return _shadow(params, versions, tags, checked, out, run_id)
    return _canary(params, versions, tags, checked, out, run_id, list(skip or []), reason)


def _record(params: Params, stage: str, versions: ps.Versions, outcome: str, run_id: str, headline: str,
            result: Any, files: list[Path] | None = None, tags: dict[str, str] | None = None) -> str:  # fmt: skip
    """The stage's MLflow run and Prefect artifacts; the MLflow run id."""
    from vitops.flows.pilot_records import publish, record_stage

    summary = result.summary if result is not None else None
    paths = result.files if result is not None else files
    mlflow_run = record_stage(params, stage, versions, outcome, run_id, summary, paths, tags)
    report = result.files[0] if result is not None else None
    publish(stage, versions, mlflow_run, headline, report, summary)
    return mlflow_run


def _shadow(params: Params, versions: ps.Versions, tags: dict[str, str], checked: ps.BatchCheck, out: Path,
            run_id: str) -> Any:  # fmt: skip
    """`tags`: the candidate's, as read before the stage (the gate override decides how `pilot` moves)."""
    result = shadow_task(params, versions, checked, out, run_id)
    agree = result.summary["agreement"]
    against = f"champion version {versions.champion}" if versions.champion else "no champion"
    head = f"shadow of {versions.name} version {versions.candidate} against {against}: " + (
        f"agreement {agree * 100:.2f} %" if agree is not None else "answers recorded"
    )
    mlflow_run = _record(params, ps.SHADOW, versions, "recorded", run_id, head, result)
    registry.set_version_tags(versions.name, versions.candidate, {
        ps.TAG_SHADOW_RUN: mlflow_run, ps.TAG_SHADOW_TIME: utc_now(),
        "pilot.shadow.agreement": "none" if agree is None else f"{agree:.6f}",
    })  # fmt: skip
    if versions.pilot != versions.candidate:
        move_task(versions.name, "pilot", versions.candidate, versions.pilot,
                  f"shadow pilot, MLflow run {mlflow_run}", run_id, override=_overridden(tags))  # fmt: skip
    return Completed(message=f"{head}; alias pilot -> version {versions.candidate} (report {result.files[0]})")


def _overridden(tags: dict[str, str]) -> bool:
    """Whether the candidate (by its tags) enters `pilot` past a failed KPI gate (allowed only by
    `pilot_refusal`'s skip)."""
    return tags.get("gate.passed") != "true"


def _canary(params: Params, versions: ps.Versions, tags: dict[str, str], checked: ps.BatchCheck, out: Path,
            run_id: str, skip: list[str], reason: str) -> Any:  # fmt: skip
    """`tags`: the candidate's, as read before the stage."""
    if not tags.get(ps.TAG_SHADOW_RUN) and ps.SHADOW not in skip:
        message = (f"version {versions.candidate} of {versions.name} has no shadow record: run stage=shadow first, "
                   "or pass skip=[\"shadow\"] with a reason")  # fmt: skip
        _record(params, ps.CANARY, versions, "refused", run_id, message, None)
        return Failed(name=REFUSED, message=message)
    result = canary_task(params, versions, checked, out, run_id)
    failed = [c.reason for c in result.checks if not c.passed]
    head = f"canary of {versions.name} version {versions.candidate}: {result.verdict}"
    extra = {"vitops.pilot.skipped": ",".join(skip), "vitops.pilot.reason": reason} if skip else {}
    mlflow_run = _record(params, ps.CANARY, versions, result.verdict, run_id, head, result, tags=extra)
    registry.set_version_tags(versions.name, versions.candidate, {
        ps.TAG_CANARY_RUN: mlflow_run, ps.TAG_CANARY_OUTCOME: result.verdict,
        ps.TAG_CANARY_REASONS: " ".join(failed) or "all guardrails held",
        "pilot.canary.time": utc_now(),
    })  # fmt: skip
    holder = registry.current_aliases(versions.name).get("pilot")
    if result.verdict == "breach":
        if holder == versions.candidate:
            move_task(versions.name, "pilot", None, versions.candidate,
                      "canary guardrail breach: " + " ".join(failed), run_id)  # fmt: skip
        champion = f"champion version {versions.champion} untouched" if versions.champion else "no champion"
        return Failed(name=BREACH, message=f"{head}: " + " ".join(failed) + f"; alias pilot removed, {champion}")
    if result.verdict == "inconclusive":
        return Failed(name=INCONCLUSIVE, message=f"{head}: " + " ".join(failed))
    if holder != versions.candidate:
        move_task(versions.name, "pilot", versions.candidate, holder, f"canary passed, MLflow run {mlflow_run}", run_id,
                  override=_overridden(tags))  # fmt: skip
    return Completed(message=f"{head}: every guardrail held (report {result.files[0]})")


def _promote(params: Params, versions: ps.Versions, skip: list[str], reason: str, run_id: str) -> Any:
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    name, cand = versions.name, versions.candidate
    try:
        required = ps.promotion_checks(registry.version_info(name, cand).tags, skip, reason)
    except ps.PilotError as err:
        return Failed(name=REFUSED, message=str(err))
    missing = [r for r in required if not r.met and not r.overridden]
    detail = "; ".join(r.detail for r in required)
    if missing:
        message = (f"promotion of {name} version {cand} refused: " + "; ".join(r.detail for r in missing)
                   + ". Run the missing stage(s), or skip them with a reason")  # fmt: skip
        _record(params, ps.PROMOTE, versions, "refused", run_id, message, None)
        return Failed(name=REFUSED, message=message)
    seen = versions.champion
    description = (
        f"Promote **{name} version {cand}** to champion (now: {f'version {seen}' if seen else 'none'})?\n\n"
        + "\n".join(f"- {r.detail}" for r in required)
        + f"\n\nResume with `vitops approve {run_id} --approver NAME [--reject] [--comment TEXT]`."
    )
    logger.warning("waiting for an approval: vitops approve %s --approver NAME [--reject] [--comment TEXT]", run_id)
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description),
            timeout=params.pilot.approval_timeout_s,
            poll_interval=params.pilot.approval_poll_s,
        )
    except FlowPauseTimeout:
        ps.record_approval(versions, "timeout", "", f"no answer in {params.pilot.approval_timeout_s} s", run_id)
        message = f"no approval within {params.pilot.approval_timeout_s} s (pilot.approval_timeout_s): nothing moved"
        _record(params, ps.PROMOTE, versions, "timeout", run_id, message, None)
        return Failed(name=TIMED_OUT, message=message)
    decision = "approved" if answer.approve else "rejected"
    ps.record_approval(versions, decision, answer.approver, answer.comment, run_id)
    who = f"{decision} by {answer.approver}" + (f": {answer.comment}" if answer.comment else "")
    if not answer.approve:
        message = f"promotion of {name} version {cand} {who}; every alias as it was"
        _record(params, ps.PROMOTE, versions, "rejected", run_id, message, None)
        return Failed(name=REJECTED, message=message)
    try:
        move = ps.promote_approved(versions, run_id, seen, reason or detail, "gate" in skip)
    except (aliases.MoveConflict, ps.PilotError, registry.RegistryError) as err:
        message = f"approved, but champion not moved: {err}"
        _record(params, ps.PROMOTE, versions, "conflict", run_id, message, None)
        return Failed(name=CONFLICT, message=message)
    message = f"champion of {name} -> version {cand} (was {seen or 'none'}), {who} (history entry {move.seq})"
    _record(params, ps.PROMOTE, versions, "promoted", run_id, message, None,
            tags={"vitops.pilot.approver": answer.approver, "vitops.pilot.skipped": ",".join(skip)})  # fmt: skip
    return Completed(message=message)


def _rollback(params: Params, reason: str, run_id: str) -> Any:
    from vitops.flows import tracking

    tracking.configure(params.tracking.uri, params.tracking.experiment)
    name = params.tracking.registered_model
    if not reason.strip():
        return Failed(name=REFUSED, message="a rollback needs a reason, which the history keeps: pass reason=...")
    try:
        move = aliases.rollback(name, "champion", reason=reason, flow_run_id=run_id)
    except registry.RegistryError as err:
        return Failed(name=REFUSED, message=str(err))
    versions = ps.Versions(name, str(move.from_version), str(move.to_version), None)
    message = f"champion of {name} rolled back: version {move.from_version} -> {move.to_version} ({reason})"
    _record(params, ps.ROLLBACK, versions, "rolled-back", run_id, message, None,
            tags={"vitops.pilot.reason": reason, "vitops.pilot.restored_version": str(move.to_version)})  # fmt: skip
    registry.set_version_tags(name, str(move.from_version), {"pilot.rolled_back": f"{utc_now()}: {reason}"})
    return Completed(message=message)


def approve(flow_run_id: str, approver: str, reject: bool = False, comment: str = "") -> str:
    """Resume a paused `promote` run with a person's decision, through the Prefect API.

    Raises:
        PilotError: no such flow run, it is not paused waiting for an approval, or the API refused the input.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    if not approver.strip():
        raise ps.PilotError("--approver NAME is required: the approval is recorded with who gave it")
    try:
        run_uuid = UUID(flow_run_id)
    except ValueError as err:
        raise ps.PilotError(f"{flow_run_id!r} is not a flow run id (a UUID, as the paused run's log shows)") from err
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_uuid)
        except ObjectNotFound as err:
            raise ps.PilotError(f"no flow run {flow_run_id} at this Prefect API: check PREFECT_API_URL") from err
    state = run.state
    if state is None or not state.is_paused():
        raise ps.PilotError(
            f"flow run {flow_run_id} ({run.name}) is {state.name if state else 'without a state'}, not paused for "
            "an approval: nothing to approve"
        )
    if not state.state_details.run_input_keyset:
        raise ps.PilotError(f"flow run {flow_run_id} is paused but waits for no input: resume it in the Prefect UI")
    decision = {"approve": not reject, "approver": approver.strip(), "comment": comment}
    try:
        resume_flow_run(run_uuid, run_input=decision)
    except FlowPauseTimeout as err:
        raise ps.PilotError(f"flow run {flow_run_id} can no longer be resumed: its approval timed out") from err
    except RuntimeError as err:
        raise ps.PilotError(f"the Prefect API refused the approval of {flow_run_id}: {err}") from err
    return f"{'rejected' if reject else 'approved'} flow run {flow_run_id} ({run.name}) as {approver.strip()}"
