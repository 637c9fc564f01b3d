"""`vitops endpoint`: serve a registered model to the line over HTTP, following one of its aliases.

vitops endpoint NAME [--alias champion] [--host 127.0.0.1] [--port 8080] [--station ID]
        serve NAME@ALIAS with LitServe (Open Inference Protocol routes, /predict, /feedback, /metrics) until
        Ctrl+C or SIGTERM; it moves to the version the alias points at without a restart. Serving champion, it
        pilots the version holding `pilot` beside it (shadow or canary, as its stage tag says) and stops it on an
        online guardrail breach. Every answer goes to the prediction log (params.yaml `prediction_log`), as
        station ID (default: `endpoint.station`, else the host name). The other settings are params.yaml's
        `endpoint` and `pilot.online` sections; docs/endpoint.md has the routes and how to run it as a service.
"""

from __future__ import annotations

import argparse

from vitops.flows.config import Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.flows.endpoint.server import EndpointError
    from vitops.flows.registry import RegistryError

    return (EndpointError, RegistryError)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommand to the `vitops` parser."""
    p = sub.add_parser("endpoint", help="serve a registered model over HTTP, following an alias (LitServe, OIP)")
    p.add_argument("name", help="registered model")
    p.add_argument("--alias", default="champion", help="alias to serve and follow (default: champion)")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--station", help="station id in the prediction log (default: endpoint.station, else host name)")
    p.set_defaults(handler=cmd_endpoint)


def cmd_endpoint(args: argparse.Namespace, params: Params) -> int:
    """Serve until interrupted; prints what it serves once the first version passed its checks."""
    from vitops.flows.endpoint.server import serve
    from vitops.flows.tracking import tracking_uri

    settings = params.endpoint
    if args.station is not None:
        from vitops.flows.endpoint.recorder import check_station
        from vitops.flows.endpoint.server import EndpointError

        try:
            check_station(args.station)
        except ValueError as err:
            raise EndpointError(f"--station: {err}") from None
        settings = settings.model_copy(update={"station": args.station})
    serve(args.name, args.alias, args.host, args.port, settings, tracking_uri(params.tracking.uri),
          announce=lambda line: print(line, flush=True), verbose=args.verbose, log_params=params.prediction_log,
          pilot_params=params.pilot)  # fmt: skip
    print("vitops endpoint: stopped")
    return 0
