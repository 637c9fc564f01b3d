"""`vitops approve`: a person's answer to a paused `promote` run, bound to who they are.

Where the tracking server authenticates (`mlflow server --app-name basic-auth`), the approver is the MLflow user
of `MLFLOW_TRACKING_USERNAME` (the server checked the password), not a name typed in: `approve` refuses a user
without MANAGE on the registered model, writes its attestation onto the candidate version under that user's own
credentials (`approval.attested_by`, `approval.attested_flow_run_id`), and only then resumes the run through the
Prefect API. The promote step reads the attestation back and checks the approver's MANAGE again before it moves
`champion` (`promotion.approver_refusal`), so a resume sent to the Prefect API by anyone else moves nothing.

Without authentication (the embedded default) the approver is the `--approver` name, as before, and the records
say "unauthenticated".
"""

from __future__ import annotations

from uuid import UUID

from vitops.common.files import utc_now
from vitops.flows import access, registry
from vitops.flows.pilot_batch import PilotError
from vitops.flows.promotion import ATTESTED_BY, ATTESTED_RUN


def approve(flow_run_id: str, approver: str = "", reject: bool = False, comment: str = "", model: str = "") -> str:
    """Resume a paused `promote` run with a person's decision, through the Prefect API.

    Args:
        flow_run_id: the paused run.
        approver: the approver's name; where the tracking server authenticates, the MLflow user (a different name
            is refused).
        reject: reject instead of approve (needs no permission: it moves nothing).
        comment: kept with the decision.
        model: the registered model when the run's parameters name none (params.yaml's).

    Raises:
        PilotError: no such flow run, it is not paused for an approval, the API refused the input, or the approver
            was not named (unauthenticated) or names someone else.
        AccessDenied: an authenticated approver without MANAGE on the model.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    me = access.identity()
    if me.authenticated and approver.strip() and approver.strip() != me.user:
        raise PilotError(
            f"--approver {approver.strip()!r}: the tracking server authenticated you as {me.user}, and the approver "
            "is the authenticated MLflow user; leave --approver out, or use that user's credentials"
        )
    approver = me.user if me.authenticated else approver.strip()
    if not approver:
        raise PilotError(
            "--approver NAME is required: this tracking server authenticates nobody, so the approval is recorded "
            "with the name given (and as unauthenticated)"
        )
    try:
        run_uuid = UUID(flow_run_id)
    except ValueError as err:
        raise PilotError(f"{flow_run_id!r} is not a flow run id (a UUID, as the paused run's log shows)") from err
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_uuid)
        except ObjectNotFound as err:
            raise PilotError(f"no flow run {flow_run_id} at this Prefect API: check PREFECT_API_URL") from err
    state = run.state
    if state is None or not state.is_paused():
        raise PilotError(
            f"flow run {flow_run_id} ({run.name}) is {state.name if state else 'without a state'}, not paused for "
            "an approval: nothing to approve"
        )
    if not state.state_details.run_input_keyset:
        raise PilotError(f"flow run {flow_run_id} is paused but waits for no input: resume it in the Prefect UI")
    if me.authenticated and not reject:
        _attest(run.parameters, model, flow_run_id, me.user)
    decision = {"approve": not reject, "approver": approver, "comment": comment}
    try:
        resume_flow_run(run_uuid, run_input=decision)
    except FlowPauseTimeout as err:
        raise PilotError(f"flow run {flow_run_id} can no longer be resumed: its approval timed out") from err
    except RuntimeError as err:
        raise PilotError(f"the Prefect API refused the approval of {flow_run_id}: {err}") from err
    who = f"{approver} ({me.describe()})" if me.authenticated else f"{approver} (unauthenticated)"
    return f"{'rejected' if reject else 'approved'} flow run {flow_run_id} ({run.name}) as {who}"


def _attest(parameters: dict, model: str, flow_run_id: str, user: str) -> None:
    """Check the user's MANAGE on the run's model and write the attestation onto the run's candidate version."""
    name = parameters.get("model_name") or model
    ref = str(parameters.get("version") or "candidate")
    access.require_manage(name, "approve a promotion")
    version = ref if ref.isdigit() else registry.current_aliases(name).get(ref)
    if version is None:
        raise PilotError(f"{ref} of {name} is not set: the paused run's candidate is gone; nothing approved")
    registry.set_version_tags(name, version, {ATTESTED_BY: user, ATTESTED_RUN: flow_run_id,
                                              "approval.attested_at": utc_now()})  # fmt: skip
