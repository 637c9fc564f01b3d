"""The `pilot` flow: a candidate proves itself on new images from the site before it replaces the champion.

    prefect deployment run 'pilot/staged' --param stage='"shadow"'     # champion serves, candidate recorded
    prefect deployment run 'pilot/staged' --param stage='"canary"'     # a hash share to the candidate, guardrails
    prefect deployment run 'pilot/staged' --param stage='"promote"'    # checks, then pauses for an approval
    vitops approve FLOW_RUN_ID [--reject] [--comment TEXT]       # as your MLflow user (or --approver NAME)
    prefect deployment run 'pilot/staged' --param stage='"rollback"' --param reason='"..."'
    prefect deployment run 'pilot/staged' --param stage='"shadow"' --param source='"log"'   # on live traffic

Each stage is one run. Evidence comes from a batch folder (`source="batch"`, scored here) or from the endpoints'
prediction log (`source="log"`, `since=...`: the answers the line got while the stage ran; `flows/pilot_log.py`).
Starting a stage records it on the candidate version (`pilot.stage`, `pilot.canary_fraction`,
`pilot.stage_since`): endpoints serving `champion` then shadow it or route a canary share to it; a breach stops
it, and `promote` and `rollback` end it.

A batch goes through the data gate first: rejected files are listed and never scored, and no file of the batch
is changed. `shadow` gives the candidate the alias `pilot`; a canary guardrail breach
takes it away and ends the run Failed; `promote` asks a person (Prefect's `pause_flow_run` with an `Approval`
input), writes the decision onto the version's tags, reads it back, and only then moves `champion`, expecting
the champion it saw before it paused. A rejection, a timeout, a refused check or a lost race leave every alias
as it was. Nothing here moves `champion` without that approval, except `rollback`, which puts back the champion
before, from the registry's history. The scoring stages are in `flows/pilot_batch.py` and `flows/pilot_log.py`,
the checks and moves around the approval in `flows/promotion.py`, what each stage leaves behind in
`flows/records.py`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from prefect.states import Completed, Failed
from pydantic import Field

from vitops.flows import aliases, records, registry
from vitops.flows.config import DEFAULT_PARAMS, PilotParams, load_params
from vitops.flows.pilot_batch import (
    CANARY,
    SHADOW,
    BatchCheck,
    BatchRules,
    PilotError,
    StageResult,
    Versions,
    canary,
    check_batch,
    resolve_versions,
    shadow,
)
from vitops.flows.pilot_log import LogWindow, canary_from_log, shadow_from_log
from vitops.flows.promotion import (
    PROMOTE,
    ROLLBACK,
    canary_refusal,
    failed_gate,
    pilot_refusal,
    promote_approved,
    promotion_checks,
    record_approval,
    record_problems,
    rollback_champion,
)
from vitops.flows.retries import TRANSIENT
from vitops.flows.settings import run_context
from vitops.flows.tracking import RunContext

# Named end states: bad news is Failed with its reasons, never a traceback.
BATCH_REJECTED, REFUSED, BREACH = "Batch rejected", "Refused", "Guardrail breach"
INCONCLUSIVE, REJECTED, TIMED_OUT, CONFLICT = "Canary inconclusive", "Rejected", "Approval timed out", "Conflict"
SHADOW_FAILED = "Shadow failed"


class Approval(RunInput):
    """What a person answers to a paused `promote` (the UI's resume form, or `vitops approve`)."""

    approve: bool = Field(False, description="tick to promote the candidate to champion; leave unticked to reject")
    approver: str = Field(..., min_length=1, description="your name, kept with the version and in the history")
    comment: str = Field("", description="why; kept with the decision")


@task(cache_policy=NO_CACHE, **TRANSIENT)
def versions_task(name: str, ref: str, run: RunContext) -> Versions:
    """The candidate, the champion and the pilot as the registry has them now."""
    return resolve_versions(name, ref, run)


@task(cache_policy=NO_CACHE)
def batch_task(batch: Path, versions: Versions, out: Path, rules: BatchRules) -> BatchCheck:
    """The batch's data gate: rejected files are listed, never scored; nothing is changed."""
    return check_batch(batch, versions, out, rules)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def shadow_task(versions: Versions, checked: BatchCheck, out: Path, settings: PilotParams, run_id: str) -> StageResult:
    """Both models answer every image; only the champion's answers count."""
    return shadow(versions, checked, out, settings, run_id)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def canary_task(versions: Versions, checked: BatchCheck, out: Path, settings: PilotParams, run_id: str) -> StageResult:
    """A content-hash share to the candidate, the rest to the champion, then the guardrails."""
    return canary(versions, checked, out, settings, run_id)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def log_shadow_task(
    versions: Versions, window: LogWindow, out: Path, settings: PilotParams, run_id: str
) -> StageResult | None:
    """The candidate's logged shadow answers beside the champion's answers to the same requests."""
    return shadow_from_log(versions, window, out, settings, run_id)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def log_canary_task(
    versions: Versions, window: LogWindow, out: Path, settings: PilotParams, run_id: str
) -> StageResult | None:
    """The candidate's logged canary answers and the champion's over the same window, then the guardrails."""
    return canary_from_log(versions, window, out, settings, run_id)


@task(cache_policy=NO_CACHE, **TRANSIENT)
def move_task(
    name: str, alias: str, version: str | None, expect: str | None, reason: str, run_id: str, override: bool = False
) -> aliases.MoveRecord:
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
    source: Literal["batch", "log"] = "batch",
    since: str | None = None,
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
        source: the evidence of shadow and canary: `batch` (a folder of images, scored here) or `log` (what the
            endpoints answered on live traffic, from the prediction log in prediction_log.dir).
        since: with source=log, read the log from this time (`2026-12-04T10:00`, `24h`; default: when the stage
            started, the version's pilot.stage_since).
    """
    from prefect.runtime import flow_run

    with records.stage_logs():  # the stages' own INFO lines on the run page
        params = load_params(params_file, must_exist=params_file != str(DEFAULT_PARAMS))
        name = model_name or params.tracking.registered_model
        run_id = str(flow_run.id or "")
        skip = list(skip or [])
        if stage == ROLLBACK:
            return _rollback(name, reason, run_id, run_context(params))
        versions = versions_task(name, version, run_context(params))
        if versions.champion == versions.candidate:
            message = f"version {versions.candidate} of {versions.name} is the champion already: nothing to pilot"
            return Failed(name=REFUSED, message=message + "; name the candidate with version=...")
        if stage == PROMOTE:
            return _promote(versions, skip, reason, run_id, params.pilot)
        refusal = pilot_refusal(versions, skip, reason) or _source_refusal(source, batch, since)
        if refusal:
            return Failed(name=REFUSED, message=refusal)
        out = Path(params.pilot.out_dir) / stage
        if stage == CANARY and (refusal := canary_refusal(versions, skip)):
            records.record_pilot_stage(CANARY, versions, "refused", run_id, refusal)
            return Failed(name=REFUSED, message=refusal)
        if source == "log":
            return _from_log(stage, versions, out, params, run_id, skip, reason, since)
        rules = BatchRules.from_params(params.validate_, params.pilot)
        checked = batch_task(Path(batch or params.pilot.batch), versions, out, rules)
        if not checked.passed:
            message = f"batch {checked.root} failed its data gate: " + "; ".join(checked.failures)
            records.record_pilot_stage(stage, versions, "batch-rejected", run_id, message, files=[checked.report_path])
            return Failed(name=BATCH_REJECTED, message=message + f" ({checked.report_path})")
        fraction = params.pilot.canary_fraction if stage == CANARY else None
        records.tag_stage(versions.name, versions.candidate, stage, fraction, _stage_since(versions, stage))
        if stage == SHADOW:
            return _record_shadow(versions, shadow_task(versions, checked, out, params.pilot, run_id), run_id)
        scored = canary_task(versions, checked, out, params.pilot, run_id)
        return _record_canary(versions, scored, run_id, skip, reason)


def _from_log(stage: str, versions: Versions, out: Path, params: Any, run_id: str, skip: list[str], reason: str,
              since: str | None) -> Any:  # fmt: skip
    """A stage on live traffic: start it (the stage tags, `pilot`), then judge what the log holds since `since`."""
    from vitops.deploy.prediction_log import LogError, parse_time

    name, cand = versions.name, versions.candidate
    if versions.champion is None:
        return Failed(name=REFUSED, message=f"{name} has no champion: an endpoint pilots a version beside the "
                      "champion it serves, so there is no live traffic to judge; use source=batch")  # fmt: skip
    try:
        start = parse_time(since) if since else None
    except LogError as err:
        return Failed(name=REFUSED, message=f"since: {err}")
    fraction = params.pilot.canary_fraction if stage == CANARY else None
    began = records.tag_stage(name, cand, stage, fraction, _stage_since(versions, stage))
    if versions.pilot != cand:
        _move_pilot(versions, f"{stage} pilot on live traffic since {began}", run_id)
        versions = dataclasses.replace(versions, pilot=cand)
    window = LogWindow(Path(params.prediction_log.dir), parse_time(began) if start is None else start, time.time())
    task = log_shadow_task if stage == SHADOW else log_canary_task
    scored = task(versions, window, out, params.pilot, run_id)
    if scored is None:
        message = (
            f"{stage} of {name} version {cand} on live traffic since {began}: no {stage} answer of it in the "
            f"prediction log ({window.describe()}) yet. Endpoints serving champion version {versions.champion} "
            "pick it up at their next registry poll (endpoint.poll_s); run this stage again once the line has "
            "sent images, e.g. in an hour"
        )
        records.record_pilot_stage(stage, versions, "started", run_id, message)
        return Completed(message=message)
    if stage == SHADOW:
        return _record_shadow(versions, scored, run_id)
    return _record_canary(versions, scored, run_id, skip, reason, live=True)


def _source_refusal(source: str, batch: str | None, since: str | None) -> str | None:
    if source not in ("batch", "log"):
        return f"source={source!r}: the evidence comes from a `batch` folder or the prediction `log`"
    if source == "batch" and since:
        return "since=... reads the prediction log: pass source=log with it"
    if source == "log" and batch:
        return "batch=... is a folder to score: pass it with source=batch, or leave it out with source=log"
    return None


def _stage_since(versions: Versions, stage: str) -> str | None:
    """When the stage began, if the candidate is in it already (it holds `pilot`): a rerun keeps its window."""
    tags = versions.tags
    same = versions.pilot == versions.candidate and tags.get(records.TAG_STAGE) == stage
    return tags.get(records.TAG_STAGE_SINCE) if same else None


def _move_pilot(versions: Versions, reason: str, run_id: str) -> None:
    """Give the candidate `pilot`, a checked move from the holder seen at the start; that holder's stage ends."""
    move_task(versions.name, "pilot", versions.candidate, versions.pilot, reason, run_id,
              override=failed_gate(versions))  # fmt: skip
    if versions.pilot:
        records.tag_stage(versions.name, versions.pilot, records.STAGE_ENDED)


def _end_pilot(name: str, reason: str, run_id: str, *also: str) -> None:
    """Leave no version piloted: `pilot` removed from its holder (a checked move); its stage and `also`'s end."""
    try:
        holder = registry.current_aliases(name).get("pilot")
        if holder:
            move_task(name, "pilot", None, holder, reason, run_id)
        for version in sorted({holder, *also} - {None}):
            records.tag_stage(name, str(version), records.STAGE_ENDED)
    except (aliases.MoveConflict, registry.RegistryError) as err:  # the champion moved already: report, not fail
        get_run_logger().warning("the pilot of %s was not ended: %s", name, err)


def _record_shadow(versions: Versions, scored: StageResult, run_id: str) -> Any:
    agree = scored.summary["agreement"]
    against = f"champion version {versions.champion}" if versions.champion else "no champion"
    head = f"shadow of {versions.name} version {versions.candidate} against {against}: " + (
        f"agreement {agree * 100:.2f} %" if agree is not None else "answers recorded"
    )
    if scored.verdict == "errors":
        message = f"{head}: {scored.summary['lines'][0]} (report {scored.files[0]})"
        records.record_pilot_stage(SHADOW, versions, "errors", run_id, message, scored)
        return Failed(name=SHADOW_FAILED, message=message)
    mlflow_run = records.record_pilot_stage(SHADOW, versions, "recorded", run_id, head, scored)
    records.tag_shadow(versions, mlflow_run, agree)
    if versions.pilot != versions.candidate:
        _move_pilot(versions, f"shadow pilot, MLflow run {mlflow_run}", run_id)
    return Completed(message=f"{head}; alias pilot -> version {versions.candidate} (report {scored.files[0]})")


def _record_canary(versions: Versions, scored: StageResult, run_id: str, skip: list[str], reason: str,
                   live: bool = False) -> Any:  # fmt: skip
    failed = [c.reason for c in scored.checks if not c.passed]
    head = f"canary of {versions.name} version {versions.candidate}: {scored.verdict}"
    extra = {"vitops.pilot.skipped": ",".join(skip), "vitops.pilot.reason": reason} if skip else {}
    mlflow_run = records.record_pilot_stage(CANARY, versions, scored.verdict, run_id, head, scored, tags=extra)
    records.tag_canary(versions, mlflow_run, scored.verdict, failed)
    holder = registry.current_aliases(versions.name).get("pilot")
    if scored.verdict == "breach":
        records.tag_stage(versions.name, versions.candidate, records.STAGE_STOPPED)  # endpoints stop routing to it
        if holder == versions.candidate:
            move_task(versions.name, "pilot", None, versions.candidate,
                      "canary guardrail breach: " + " ".join(failed), run_id)  # fmt: skip
        champion = f"champion version {versions.champion} untouched" if versions.champion else "no champion"
        return Failed(name=BREACH, message=f"{head}: " + " ".join(failed) + f"; alias pilot removed, {champion}")
    if scored.verdict == "inconclusive":
        more = "; the canary goes on (pilot.stage canary): run this stage again later" if live else ""
        return Failed(name=INCONCLUSIVE, message=f"{head}: " + " ".join(failed) + more)
    if holder != versions.candidate:
        _move_pilot(dataclasses.replace(versions, pilot=holder), f"canary passed, MLflow run {mlflow_run}", run_id)
    return Completed(message=f"{head}: every guardrail held (report {scored.files[0]})")


def _promote(versions: Versions, skip: list[str], reason: str, run_id: str, settings: PilotParams) -> Any:
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    name, cand = versions.name, versions.candidate
    try:
        required = promotion_checks(versions.tags, skip, reason, record_problems(versions))
    except (PilotError, registry.RegistryError) as err:
        return Failed(name=REFUSED, message=str(err))
    missing = [r for r in required if not r.met and not r.overridden]
    detail = "; ".join(r.detail for r in required)
    if missing:
        message = (f"promotion of {name} version {cand} refused: " + "; ".join(r.detail for r in missing)
                   + ". Run the missing stage(s), or skip them with a reason")  # fmt: skip
        records.record_pilot_stage(PROMOTE, versions, "refused", run_id, message)
        return Failed(name=REFUSED, message=message)
    seen = versions.champion
    description = (
        f"Promote **{name} version {cand}** to champion (now: {f'version {seen}' if seen else 'none'})?\n\n"
        + "\n".join(f"- {r.detail}" for r in required)
        + f"\n\nResume with `vitops approve {run_id} [--reject] [--comment TEXT]` (an authenticating tracking server "
        "names the approver; without one, add --approver NAME)."
    )
    logger.warning("waiting for an approval: vitops approve %s [--approver NAME] [--reject] [--comment TEXT]", run_id)
    timeout = settings.approval_timeout_s
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description),
            timeout=timeout,
            poll_interval=settings.approval_poll_s,
        )
    except FlowPauseTimeout:
        record_approval(versions, "timeout", "", f"no answer in {timeout} s", run_id)
        message = f"no approval within {timeout} s (pilot.approval_timeout_s): nothing moved"
        records.record_pilot_stage(PROMOTE, versions, "timeout", run_id, message)
        return Failed(name=TIMED_OUT, message=message)
    decision = "approved" if answer.approve else "rejected"
    record_approval(versions, decision, answer.approver, answer.comment, run_id)
    who = f"{decision} by {answer.approver}" + (f": {answer.comment}" if answer.comment else "")
    if not answer.approve:
        message = f"promotion of {name} version {cand} {who}; every alias as it was"
        records.record_pilot_stage(PROMOTE, versions, "rejected", run_id, message)
        return Failed(name=REJECTED, message=message)
    try:
        move = promote_approved(versions, run_id, seen, reason or detail, "gate" in skip, settings.four_eyes)
    except (aliases.MoveConflict, PilotError, registry.RegistryError) as err:
        message = f"approved, but champion not moved: {err}"
        records.record_pilot_stage(PROMOTE, versions, "conflict", run_id, message)
        return Failed(name=CONFLICT, message=message)
    message = f"champion of {name} -> version {cand} (was {seen or 'none'}), {who} (history entry {move.seq})"
    approved = {"vitops.pilot.approver": answer.approver, "vitops.pilot.skipped": ",".join(skip)}
    records.record_pilot_stage(PROMOTE, versions, "promoted", run_id, message, tags=approved)
    _end_pilot(name, f"pilot over: version {cand} is champion since move {move.seq}", run_id, cand)
    return Completed(message=message)


def _rollback(name: str, reason: str, run_id: str, run: RunContext) -> Any:
    run.configure()
    try:
        move = rollback_champion(name, reason, run_id)
    except (PilotError, registry.RegistryError) as err:
        return Failed(name=REFUSED, message=str(err))
    versions = Versions(name, str(move.from_version), str(move.to_version), None)
    message = f"champion of {name} rolled back: version {move.from_version} -> {move.to_version} ({reason})"
    restored = {"vitops.pilot.reason": reason, "vitops.pilot.restored_version": str(move.to_version)}
    records.record_pilot_stage(ROLLBACK, versions, "rolled-back", run_id, message, tags=restored)
    records.tag_rolled_back(name, str(move.from_version), reason)
    _end_pilot(name, f"pilot over: champion rolled back to version {move.to_version}", run_id, str(move.from_version))
    return Completed(message=message)
