"""`vitops` commands of the Prefect flows.

vitops retrain [--model NAME] [--data DIR] [--force] [--nproc-per-node N]
        run the retrain flow once, in this process (Prefect's ephemeral API unless PREFECT_API_URL is set);
        prints the KPI table, the registry decision and where to look; exit 1 when a gate said no
vitops drift [--since T] [--until T] [--model NAME] [--retrain]
        run the drift flow once: the line's kept images of the last drift.since_hours against the champion's
        training manifest; prints the verdict; exit 1 on a strong drift
vitops serve
        serve the deployments (retrain/nightly on retrain.cron, retrain/on-demand, pilot/staged, drift/daily on
        drift.cron) from this process; needs a Prefect server (PREFECT_API_URL) for the schedules to fire
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vitops.flows.config import DEFAULT_PARAMS, Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    return ()


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser("retrain", help="run the retrain flow once: validate ... gate, register")
    p.add_argument("--model", help="registered model (default: tracking.registered_model)")
    p.add_argument("--data", help="DVC-tracked image folder (default: data.raw_dir)")
    p.add_argument("--force", action="store_true", help="retrain even when data, params and code are unchanged")
    p.add_argument("--nproc-per-node", type=int, help="GPUs for the fine-tune (torchrun when > 1)")
    p.set_defaults(handler=cmd_retrain)

    p = sub.add_parser("drift", help="run the drift check once: the line's kept images against the training data")
    p.add_argument("--since", help="window start: 2026-12-04, 2026-12-04T06:00, 24h (default: drift.since_hours ago)")
    p.add_argument("--until", help="window end (default: now)")
    p.add_argument("--model", help="registered model (default: tracking.registered_model)")
    p.add_argument("--retrain", action="store_true", help="on a strong drift, run drift.retrain_deployment")
    p.set_defaults(handler=cmd_drift)

    p = sub.add_parser("serve", help="serve the retrain, pilot and drift deployments (schedules included)")
    p.set_defaults(handler=cmd_serve)


def prefect_settings(timeout_s: float = 20.0) -> None:
    """The settings a flow run from the command line needs: a start-up timeout for the first ephemeral API start
    here, no telemetry; with `PREFECT_API_URL`, that API answers within `timeout_s` (`VITOPS_CONNECT_TIMEOUT_S`
    wins) and takes the credentials. Prefect's INFO lines go to the run page, not the terminal (`vitops` filters
    its handler)."""
    # The ephemeral API migrates its database on the first start of a machine: 20 s is not always enough here.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The embedded (ephemeral) API's telemetry heartbeat writes to the SQLite database the flow run is using and
    # prints a "database is locked" traceback when they collide; it also reaches out to the internet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    api = os.environ.get("PREFECT_API_URL", "")
    if api:  # a real API: it answers within the limit and takes PREFECT_API_AUTH_STRING, or one clear message
        from vitops.flows.connection import check_prefect, connect_timeout

        check_prefect(api, connect_timeout(timeout_s))


def cmd_retrain(args: argparse.Namespace, params: Params) -> int:
    """Run the retrain flow and print what a user looks at."""
    prefect_settings(params.tracking.connect_timeout_s)
    from vitops.flows.retrain import DATA_GATE_FAILED, ENGINE_GATE_FAILED, KPI_GATE_FAILED, SKIPPED, retrain

    params_file = str(args.params or DEFAULT_PARAMS)
    state = retrain(
        model_name=args.model,
        data=args.data,
        params_file=params_file,
        force=args.force,
        nproc_per_node=args.nproc_per_node,
        return_state=True,
    )
    if state.name == SKIPPED:
        print(f"retrain {state.name}: {state.message}")
        return 0
    if state.is_failed() and state.name not in (DATA_GATE_FAILED, KPI_GATE_FAILED, ENGINE_GATE_FAILED):
        state.result()  # re-raises the error, which `vitops` reports with its exit code
    _print_summary(params, state)
    return 0 if state.is_completed() else 1


def _print_summary(params: Params, state: Any) -> None:
    from vitops.flows import tracking
    from vitops.flows.retrain import DATA_GATE_FAILED, ENGINE_GATE_FAILED

    decision_file = Path(params.gate.report).parent / "decision.json"
    print(f"\nretrain {state.name}: {state.message}")
    if decision_file.is_file() and state.name not in (DATA_GATE_FAILED, ENGINE_GATE_FAILED):
        decision = json.loads(decision_file.read_text(encoding="utf-8"))
        table = Path(params.gate.report).with_suffix(".txt")
        if table.is_file():
            print(table.read_text(encoding="utf-8"))
        verdict = "passed" if decision["passed"] else "FAILED"
        print(f"KPI gate {verdict} against the {decision['reference_kind']}; report {params.gate.report}")
    uri = tracking.tracking_uri(params.tracking.uri)
    ui = f"open {uri}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
    print(f"MLflow UI:  {ui}   (model {params.tracking.registered_model}: `vitops history` / `vitops lineage`)")
    api = os.environ.get("PREFECT_API_URL")
    run_id = state.state_details.flow_run_id
    ui = api.removesuffix("/api") if api else "http://127.0.0.1:4200"
    start = "" if api else "prefect server start, then "  # the ephemeral API's runs are in the same database
    print(f"Prefect UI: {start}open {ui}/runs/flow-run/{run_id}")


def cmd_drift(args: argparse.Namespace, params: Params) -> int:
    """Run the drift flow once; 0 no drift or no verdict, 1 a strong drift, 2 the retrain could not start."""
    prefect_settings(params.tracking.connect_timeout_s)
    from vitops.flows.drift import DRIFT, RETRAIN_NOT_STARTED, drift

    state = drift(
        model_name=args.model,
        since=args.since,
        until=args.until,
        params_file=str(args.params or DEFAULT_PARAMS),
        retrain_on_drift=args.retrain,
        return_state=True,
    )
    if state.is_failed() and state.name != RETRAIN_NOT_STARTED:
        state.result()  # re-raises the error, which `vitops` reports with its exit code
    print(f"drift {state.name}: {state.message}")
    return {DRIFT: 1, RETRAIN_NOT_STARTED: 2}.get(state.name, 0)


def deployments(params: Params, params_file: str) -> list[Any]:
    """The deployments `vitops serve` serves, each with `params_file` as its parameter."""
    from vitops.flows.drift import drift
    from vitops.flows.pilot import pilot
    from vitops.flows.retrain import retrain

    r = params.retrain
    return [
        retrain.to_deployment(
            name="nightly",
            cron=r.cron,
            parameters={"params_file": params_file},
            concurrency_limit=1,
            description="retrain on the current data version every night",
        ),
        retrain.to_deployment(name="on-demand", parameters={"params_file": params_file}, concurrency_limit=1),
        pilot.to_deployment(
            name="staged",
            parameters={"params_file": params_file},
            description="one stage of a staged pilot: --param stage='\"shadow\"' (canary, promote, rollback)",
        ),
        drift.to_deployment(
            name="daily",
            cron=params.drift.cron,
            parameters={"params_file": params_file},
            concurrency_limit=1,
            description="the line's kept images against the champion's training data; event vitops.drift.detected",
        ),
    ]


def cmd_serve(args: argparse.Namespace, params: Params) -> int:
    """Serve the deployments from this process until interrupted."""
    from prefect import serve

    if not os.environ.get("PREFECT_API_URL"):
        print(
            "vitops serve: PREFECT_API_URL is not set, so this serves against a temporary API that runs no "
            "scheduler: the nightly schedule will not fire. Start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api first.",
            file=sys.stderr,
        )
    params_file = str(Path(args.params or DEFAULT_PARAMS).resolve())
    serve(*deployments(params, params_file))
    return 0
