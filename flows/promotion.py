"""What a pilot asks before a candidate moves, and the moves themselves: `flows/pilot.py` calls these between its
scoring stages (`flows/pilot_batch.py`) and around the approval pause.

- `pilot_refusal` and `canary_refusal`: whether a shadow or canary may start (a gated candidate; a shadow record
  before a canary), unless skipped with a reason;
- `promotion_checks`: what `promote` asks before anyone is asked to approve (gate, shadow and canary records);
- `record_approval` and `promote_approved`: the approval is written to the version's tags, read back, and only
  then is `champion` moved, with the registry's checked move;
- `rollback_champion`: the champion before, from the registry's history.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitops.common.files import utc_now
from vitops.flows import aliases, registry
from vitops.flows.pilot_batch import CANARY, SHADOW, PilotError, Versions
from vitops.flows.records import TAG_CANARY_OUTCOME, TAG_CANARY_REASONS, TAG_SHADOW_RUN

PROMOTE, ROLLBACK = "promote", "rollback"
STAGES = (SHADOW, CANARY, PROMOTE, ROLLBACK)
SKIPPABLE = ("gate", SHADOW, CANARY)
APPROVAL_TAGS = ("decision", "approver", "time", "comment", "flow_run_id")


@dataclass
class Requirement:
    """One thing `promote` asks before it asks a person."""

    name: str  # gate | shadow | canary
    met: bool
    overridden: bool
    detail: str


def promotion_checks(tags: dict[str, str], skip: list[str], reason: str) -> list[Requirement]:
    """The KPI gate passed, a shadow record, and a canary record that passed; each may be skipped only with a
    reason, which the records keep.

    Args:
        tags: the candidate version's tags.
        skip: requirements the person skips (`gate`, `shadow`, `canary`).
        reason: why they are skipped.

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
        if not r.met and r.name in skip:
            r.overridden = True
            r.detail += f" (skipped: {reason.strip()})"
    return found


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
    versions: Versions, flow_run_id: str, expect_champion: str | None, reason: str, override_gate: bool
) -> aliases.MoveRecord:
    """Move `champion` to the candidate after reading its approval back from the registry.

    Raises:
        PilotError: the registry holds no approval of this flow run for this version.
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


def rollback_champion(name: str, reason: str, flow_run_id: str) -> aliases.MoveRecord:
    """Put back the champion before, from the registry's history.

    Raises:
        PilotError: no reason given (the history keeps it).
        RegistryError: nothing to roll back to, or the move lost a race.
    """
    if not reason.strip():
        raise PilotError("a rollback needs a reason, which the history keeps: pass reason=...")
    return aliases.rollback(name, "champion", reason=reason, flow_run_id=flow_run_id)
