"""`vitops` commands of the staged pilot.

vitops pilot STAGE [--model NAME] [--version candidate|N] [--batch DIR] [--skip shadow,canary] [--reason TEXT]
             [--source batch|log] [--since TIME]
        run one stage of the pilot flow in this process (shadow, canary, promote, rollback); prints what it
        recorded; exit 1 when the stage said no (batch rejected, guardrail breach, refused, rejected, timed out).
        --source log: shadow and canary judge what the endpoints answered on live traffic (the prediction log)
        since TIME (2026-12-04T10:00, 24h; default: when the stage started) instead of scoring a batch
vitops approve FLOW_RUN_ID [--approver NAME] [--reject] [--comment TEXT]
        answer a paused `promote` run through the Prefect API (Prefect has no CLI verb for resuming a run); where
        the tracking server authenticates, as your MLflow user, who needs MANAGE on the model (--approver only
        without authentication)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vitops.flows.config import DEFAULT_PARAMS, Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.data_checks.batch import BatchError
    from vitops.deploy.prediction_log import LogError
    from vitops.flows.pilot_batch import PilotError

    return (PilotError, BatchError, LogError)  # AccessDenied is a RegistryError: the registry group names it


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser("pilot", help="run one stage of the staged pilot: shadow, canary, promote or rollback")
    p.add_argument("stage", choices=["shadow", "canary", "promote", "rollback"])
    p.add_argument("--model", help="registered model (default: tracking.registered_model)")
    p.add_argument("--version", default="candidate", help="the candidate: candidate, pilot or a version number")
    p.add_argument("--batch", help="folder of new images (default: pilot.batch)")
    p.add_argument("--skip", default="", help="promote: comma-separated requirements skipped (gate,shadow,canary)")
    p.add_argument("--reason", default="", help="why (a skip or a rollback); recorded")
    evidence = "shadow/canary evidence: a batch folder scored here, or the endpoints' prediction log"
    p.add_argument("--source", choices=["batch", "log"], default="batch", help=evidence)
    since = "with --source log: read the log from TIME (2026-12-04T10:00, 24h, 7d; default: when the stage started)"
    p.add_argument("--since", help=since)
    p.set_defaults(handler=cmd_pilot)

    p = sub.add_parser("approve", help="approve (or --reject) a paused promote run, as your MLflow user")
    p.add_argument("flow_run_id", help="the paused run's id (its log and the Prefect UI show it)")
    who = "your name, where the tracking server authenticates nobody (else your MLflow user is the approver)"
    p.add_argument("--approver", default="", help=who)
    p.add_argument("--reject", action="store_true", help="reject: nothing is moved")
    p.add_argument("--comment", default="", help="recorded with the decision")
    p.set_defaults(handler=cmd_approve)


def cmd_pilot(args: argparse.Namespace, params: Params) -> int:
    """Run one pilot stage and print its outcome and report."""
    from vitops.flows.cli.runs import prefect_settings

    prefect_settings(params.tracking.connect_timeout_s)  # before Prefect is imported: it sets up its logging then
    from prefect.exceptions import FailedRun

    from vitops.flows.pilot import BREACH, INCONCLUSIVE, pilot
    from vitops.flows.pilot_batch import PilotError

    if args.since is not None:
        from vitops.deploy.prediction_log import LogError, parse_time

        if args.source != "log":
            raise PilotError("--since reads the prediction log: pass --source log with it")
        try:
            parse_time(args.since)  # a bad value is a usage error (exit 2), before anything runs
        except LogError as err:
            raise PilotError(f"--since: {err}") from err
    if args.source == "log" and args.batch:
        raise PilotError("--batch is a folder to score: use it with --source batch, not --source log")
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    started = time.time()
    state = pilot(
        stage=args.stage,
        model_name=args.model,
        version=args.version,
        batch=args.batch,
        params_file=str(args.params or DEFAULT_PARAMS),
        skip=skip,
        reason=args.reason,
        source=args.source,
        since=args.since,
        return_state=True,
    )
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException) and not isinstance(outcome, FailedRun):
        raise outcome  # a crash, which `vitops` reports with its exit code; a stage that said no is FailedRun
    print(f"pilot {args.stage} {state.name}: {state.message}")
    report = Path(params.pilot.out_dir) / args.stage / "report.md"
    summary = Path(params.pilot.out_dir) / args.stage / "summary.json"
    scored = state.is_completed() or state.name in (BREACH, INCONCLUSIVE)
    fresh = summary.is_file() and summary.stat().st_mtime >= started  # a stage just started wrote none
    if args.stage in ("shadow", "canary") and scored and fresh:
        data = json.loads(summary.read_text(encoding="utf-8"))
        for role, m in data.get("measures", {}).items():
            p50 = "-" if m["p50_ms"] is None else f"{m['p50_ms']:.2f}"
            p95 = "-" if m["p95_ms"] is None else f"{m['p95_ms']:.2f}"
            print(f"  {role:9} v{m['version']:<3} {m['engine']:18} {m['images']:4d} images  top-1 "
                  f"{m['accuracy_text']}  p50 {p50} ms  p95 {p95} ms")  # fmt: skip
        print(f"  report {report}")
    return 0 if state.is_completed() else 1


def cmd_approve(args: argparse.Namespace, params: Params) -> int:
    """Resume a paused promote run with the decision."""
    from vitops.flows.cli.runs import prefect_settings

    prefect_settings(params.tracking.connect_timeout_s)
    from vitops.flows.approval import approve
    from vitops.flows.settings import run_context

    run_context(params).configure()  # who the tracking server says you are
    model = params.tracking.registered_model
    print(approve(args.flow_run_id, args.approver, reject=args.reject, comment=args.comment, model=model))
    return 0
