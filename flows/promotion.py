"""What a pilot asks before a candidate moves, and the moves themselves: `flows/pilot.py` calls these between its
scoring stages (`flows/pilot_batch.py`) and around the approval pause.

- `pilot_refusal` and `canary_refusal`: whether a shadow or canary may start (a gated candidate; a shadow record
  before a canary), unless skipped with a reason;
- `promotion_checks`: what `promote` asks before anyone is asked to approve (gate, shadow and canary records),
  each record checked against what produced it (`record_problems`: the gate verdict against the version's
  manifest, the shadow and canary records against their MLflow runs), so editing a tag forges none;
- `record_approval` and `promote_approved`: the approval is written to the version's tags, read back, and only
  then is `champion` moved, with the registry's checked move; where the tracking server authenticates, the
  approver must be the MLflow user who attested it (`vitops approve` under their own credentials), still hold
  MANAGE on the model, and, with `pilot.four_eyes`, be neither who registered the candidate nor who promotes;
- `rollback_champion`: the champion before, from the registry's history.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitops.common.files import utc_now
from vitops.flows import access, aliases, artifacts, registry
from vitops.flows.pilot_batch import CANARY, SHADOW, PilotError, Versions
from vitops.flows.records import (
    PILOT_OUTCOME_TAG,
    PILOT_STAGE_TAG,
    TAG_CANARY_OUTCOME,
    TAG_CANARY_REASONS,
    TAG_CANARY_RUN,
    TAG_SHADOW_RUN,
)

PROMOTE, ROLLBACK = "promote", "rollback"
STAGES = (SHADOW, CANARY, PROMOTE, ROLLBACK)
SKIPPABLE = ("gate", SHADOW, CANARY)
APPROVAL_TAGS = ("decision", "approver", "time", "comment", "flow_run_id")
ATTESTED_BY, ATTESTED_RUN = "approval.attested_by", "approval.attested_flow_run_id"  # written by `vitops approve`


@dataclass
class Requirement:
    """One thing `promote` asks before it asks a person."""

    name: str  # gate | shadow | canary
    met: bool
    overridden: bool
    detail: str


def promotion_checks(
    tags: dict[str, str], skip: list[str], reason: str, problems: dict[str, str] | None = None
) -> list[Requirement]:
    """The KPI gate passed, a shadow record, and a canary record that passed; each may be skipped only with a
    reason, which the records keep.

    Args:
        tags: the candidate version's tags.
        skip: requirements the person skips (`gate`, `shadow`, `canary`).
        reason: why they are skipped.
        problems: requirement -> why its record is not backed by what produced it (`record_problems`): unmet.

    Raises:
        PilotError: an unknown name in `skip`, or a skip without a reason.
    """
    problem = skip_problem(skip, reason)
    if problem:
        raise PilotError(problem)
    gate = tags.get("gate.passed") == "true"
    shadow_run = tags.get(TAG_SHADOW_RUN, "")
    outcome = tags.get(TAG_CANARY_OUTCOME, "")
    found = [
        Requirement("gate", gate, False, f"KPI gate {'passed' if gate else 'not passed'}: {gate_record(tags)}"),
        Requirement(SHADOW, bool(shadow_run), False,
                    f"shadow record: MLflow run {shadow_run}" if shadow_run else "no shadow record"),
        Requirement(CANARY, outcome == "passed", False,
                    f"canary {outcome}: {tags.get(TAG_CANARY_REASONS, '')}".strip(": ") if outcome
                    else "no canary record"),
    ]  # fmt: skip
    for r in found:
        if r.met and r.name in (problems or {}):
            r.met, r.detail = False, f"{r.detail}, not backed by its record: {problems[r.name]}"  # type: ignore[index]
        if not r.met and r.name in skip:
            r.overridden = True
            r.detail += f" (skipped: {reason.strip()})"
    return found


def record_problems(versions: Versions) -> dict[str, str]:
    """Requirement -> why the candidate's record of it is not backed by what produced it: the gate verdict and
    the other registration records against the version's manifest, the shadow and canary records against the
    MLflow runs they name (model, version, stage and outcome)."""
    problems = {}
    edited = artifacts.edited_records(versions.name, versions.candidate)
    if edited:
        problems["gate"] = edited
    for stage, run_tag, outcome in ((SHADOW, TAG_SHADOW_RUN, "recorded"),
                                    (CANARY, TAG_CANARY_RUN, versions.tags.get(TAG_CANARY_OUTCOME, ""))):  # fmt: skip
        run_id = versions.tags.get(run_tag)
        if not run_id:
            continue
        expected = {"vitops.model": versions.name, "vitops.pilot.candidate_version": versions.candidate,
                    PILOT_STAGE_TAG: stage, PILOT_OUTCOME_TAG: outcome}  # fmt: skip
        found = artifacts.run_tags(run_id)
        if found is None:
            problems[stage] = f"its MLflow run {run_id} does not exist"
            continue
        wrong = [f"{k}={found.get(k)!r}, not {v!r}" for k, v in expected.items() if found.get(k) != v]
        if wrong:
            problems[stage] = f"its MLflow run {run_id} says " + ", ".join(wrong)
    return problems


def pilot_refusal(versions: Versions, skip: list[str], reason: str) -> str | None:
    """Why a shadow or canary may not start, or None: a pilot starts from a version that passed its KPI gate
    (by the candidate's tags), unless `gate` is skipped with a reason (which the registry's history then keeps
    as an override)."""
    problem = skip_problem(skip, reason)
    if problem:
        return problem
    if failed_gate(versions) and "gate" not in skip:
        return (
            f"version {versions.candidate} of {versions.name} did not pass its KPI gate "
            f"({gate_record(versions.tags)}): "
            'a pilot starts from a gated candidate; pass skip=["gate"] with a reason to pilot it anyway'
        )
    return None


def canary_refusal(versions: Versions, skip: list[str]) -> str | None:
    """Why a canary may not start, or None: it follows a shadow, unless `shadow` is skipped."""
    if not versions.tags.get(TAG_SHADOW_RUN) and SHADOW not in skip:
        return (
            f"version {versions.candidate} of {versions.name} has no shadow record: run stage=shadow first, "
            'or pass skip=["shadow"] with a reason'
        )
    return None


def failed_gate(versions: Versions) -> bool:
    """Whether the candidate (by its tags) did not pass its KPI gate: it enters `pilot` only as an override,
    which `pilot_refusal` allows with a skip and a reason."""
    return versions.tags.get("gate.passed") != "true"


def skip_problem(skip: list[str], reason: str) -> str | None:
    """What is wrong with a skip list, or None: only `SKIPPABLE` names, and never without a reason."""
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        return f"skip {unknown}: only {list(SKIPPABLE)} may be skipped"
    if skip and not reason.strip():
        return f"skipping {sorted(skip)} needs a reason, which the records keep: pass reason=..."
    return None


def gate_record(tags: dict[str, str]) -> str:
    """The KPI gate's one-line record on a version's tags."""
    return tags.get("gate.summary") or tags.get("gate.reasons") or "no gate record"


def approval_tags(decision: str, approver: str, comment: str, flow_run_id: str) -> dict[str, str]:
    """The version tags of an approval decision (approved, rejected or timeout)."""
    values = (decision, approver, utc_now(), comment, flow_run_id)
    return {f"approval.{k}": v for k, v in zip(APPROVAL_TAGS, values, strict=True)}


def record_approval(versions: Versions, decision: str, approver: str, comment: str, flow_run_id: str) -> dict:
    """Write the decision onto the candidate version and return the tags as the registry now has them."""
    return registry.set_version_tags(
        versions.name, versions.candidate, approval_tags(decision, approver, comment, flow_run_id)
    )


def promote_approved(
    versions: Versions, flow_run_id: str, expect_champion: str | None, reason: str, override_gate: bool,
    four_eyes: bool = False,
) -> aliases.MoveRecord:  # fmt: skip
    """Move `champion` to the candidate after reading its approval back from the registry and checking, where the
    tracking server authenticates, the approver again (`approver_refusal`).

    Raises:
        PilotError: the registry holds no approval of this flow run for this version, or the approver may not.
        MoveConflict: the champion moved since the pilot saw it (another promotion or a rollback won).
    """
    tags = registry.version_info(versions.name, versions.candidate).tags
    approval = {k: tags.get(f"approval.{k}", "") for k in APPROVAL_TAGS}
    if approval["decision"] != "approved" or approval["flow_run_id"] != flow_run_id:
        raise PilotError(
            f"version {versions.candidate} of {versions.name} carries no approval of flow run {flow_run_id} "
            f"(the registry has decision={approval['decision'] or 'none'}, flow run "
            f"{approval['flow_run_id'] or 'none'}): champion not moved"
        )
    me = access.identity()
    refusal = approver_refusal(versions, tags, approval["approver"], flow_run_id, me, four_eyes)
    if refusal:
        raise PilotError(f"{refusal}: champion not moved")
    approval |= {"identity": "authenticated MLflow user" if me.authenticated else access.UNAUTHENTICATED,
                 "promoted_by": me.user}  # fmt: skip
    move = aliases.move_alias(
        versions.name, "champion", versions.candidate,
        expect=expect_champion or "none",
        reason=f"approved by {approval['approver']}: {approval['comment'] or reason}".strip(),
        flow_run_id=flow_run_id, approval=approval, override_gate=override_gate,
    )  # fmt: skip
    if registry.current_aliases(versions.name).get("pilot") == versions.candidate:
        aliases.move_alias(
            versions.name, "pilot", None, expect=versions.candidate,
            reason=f"pilot over: champion since move {move.seq}", flow_run_id=flow_run_id,
        )  # fmt: skip
    return move


def approver_refusal(
    versions: Versions, tags: dict[str, str], approver: str, flow_run_id: str, me: access.Identity, four_eyes: bool
) -> str | None:
    """Why the approver may not promote the candidate, or None; where the server authenticates nobody, None (the
    approval works as before and is recorded as unauthenticated)."""
    if not me.authenticated:
        return None
    name = versions.name
    if tags.get(ATTESTED_BY) != approver or tags.get(ATTESTED_RUN) != flow_run_id:
        return (
            f"the approval by {approver!r} of flow run {flow_run_id} is not attested in the registry by that MLflow "
            f"user (it has {tags.get(ATTESTED_BY) or 'none'} for {tags.get(ATTESTED_RUN) or 'no run'}): approve "
            "with `vitops approve` under your own MLflow credentials"
        )
    if not access.may_manage(name, approver):
        return f"{approver} no longer holds MANAGE on {name} (checked again before the move)"
    if four_eyes:
        registered_by = tags.get(registry.REGISTERED_BY_TAG, "")
        if approver == registered_by:
            who = f"{approver} registered version {versions.candidate}"
            return f"four eyes (pilot.four_eyes): {who}, so may not approve it"
        if approver == me.user:
            return f"four eyes (pilot.four_eyes): {approver} started this promote and may not approve it too"
    return None


def rollback_champion(name: str, reason: str, flow_run_id: str) -> aliases.MoveRecord:
    """Put back the champion before, from the registry's history.

    Raises:
        PilotError: no reason given (the history keeps it).
        RegistryError: nothing to roll back to, or the move lost a race.
    """
    if not reason.strip():
        raise PilotError("a rollback needs a reason, which the history keeps: pass reason=...")
    return aliases.rollback(name, "champion", reason=reason, flow_run_id=flow_run_id)
