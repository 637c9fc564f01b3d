"""`vitops endpoint NAME`: one registered model served over HTTP on LitServe, following an alias.

The processes of one endpoint, and why:

- this process (LitServe's main): checks the settings, makes the state folder (`state.py`) and the metrics
  folder, and runs LitServer. It never imports MLflow or a model: LitServe forks its HTTP processes from it;
- the first fetch and then the follower (`follower.py`), each in a spawned process: they talk to the registry;
- LitServe's inference workers (`worker.py`), spawned, `endpoint.workers` per device: each holds the served
  version and swaps it in place;
- LitServe's API servers (`routes.py`), forked, `endpoint.api_servers`: HTTP, decoding, checks, metrics.

Stopping: Ctrl+C or SIGTERM ends LitServe's processes, then the follower, and removes the state folder; the
verified downloads stay in `endpoint.cache_dir`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vitops.flows.config import EndpointParams

log = logging.getLogger("vitops.endpoint")
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds


class EndpointError(RuntimeError):
    """An endpoint that cannot start as configured; the message says what to change."""


def serve(
    name: str,
    alias: str,
    host: str,
    port: int,
    settings: EndpointParams,
    tracking_uri: str,
    announce: Callable[[str], None] = print,
    verbose: bool = False,
) -> None:
    """Serve `name@alias` on `host:port` until interrupted.

    Raises:
        EndpointError: a setting that cannot work (host, port, a token variable that is not set), or a version
            that fails its checks at start.
        RegistryError: the alias is not set or the registry cannot be read at start.
    """
    from vitops.flows.registry import check_alias, check_name

    check_name(name)
    check_alias(alias)
    if host not in HOSTS:
        raise EndpointError(f"--host {host}: LitServe binds 127.0.0.1 (this machine), 0.0.0.0 or :: (all interfaces)")
    if not 1024 <= port <= 65535:
        raise EndpointError(f"--port {port}: use a port from 1024 to 65535 (a reverse proxy can own port 80/443)")
    token, secret = _secret(settings.token_env, "token_env"), _secret(settings.webhook_secret_env, "webhook_secret_env")
    if "prometheus_client" in sys.modules:
        raise EndpointError("prometheus_client was imported before the endpoint set PROMETHEUS_MULTIPROC_DIR")
    state_dir = Path(tempfile.mkdtemp(prefix="vitops-endpoint-"))
    (state_dir / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state_dir / "metrics")  # before any process imports the client
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in a service log
    follower_proc = None
    try:
        from vitops.flows.endpoint.follower import FollowerConfig, first_version, follow

        cfg = FollowerConfig(name, alias, settings.poll_s, settings.swap_timeout_s,
                             Path(settings.cache_dir).expanduser(), state_dir, 0, tracking_uri, verbose)  # fmt: skip
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # MLflow stays out of the process LitServe forks
            serving = pool.submit(first_version, cfg).result()
        server, n_workers = _litserver(name, alias, state_dir, settings, token, secret, verbose)
        follower_proc = ctx.Process(target=follow, args=(_with(cfg, n_workers=n_workers),), name="vitops-follower")
        follower_proc.daemon = True
        follower_proc.start()
        auth = "bearer token required" if token else "no auth"
        announce(
            f"vitops endpoint: {name}@{alias} = version {serving['version']} on http://{host}:{port} ({auth}; "
            f"{n_workers} worker(s), batches of up to {settings.max_batch_size}); follows @{alias} every "
            f"{settings.poll_s:g} s{' and on MLflow webhooks' if secret else ''}. Routes: /predict, "
            f"/v2/models/{name}[/infer], /v2/health/ready, /metrics. Ctrl+C stops."
        )
        main_pid = os.getpid()
        signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt(main_pid, signum))
        try:
            server.run(
                host=host,
                port=port,
                num_api_servers=settings.api_servers or None,
                log_level="debug" if verbose else "warning",
                generate_client_file=False,
                access_log=verbose,
            )
        except KeyboardInterrupt:
            pass  # a stop signal while LitServe was starting or stopping: the finally below still cleans up
        except RuntimeError as err:
            raise EndpointError(_start_failure(state_dir, err)) from None
    finally:
        if follower_proc is not None and follower_proc.is_alive():
            follower_proc.terminate()
            follower_proc.join(5)
        shutil.rmtree(state_dir, ignore_errors=True)


def _litserver(name: str, alias: str, state_dir: Path, settings: EndpointParams, token: str | None,
               secret: str | None, verbose: bool) -> tuple[Any, int]:  # fmt: skip
    import litserve as ls
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from vitops.deploy.image_input import Limits
    from vitops.flows.endpoint.routes import EndpointRoutes
    from vitops.flows.endpoint.worker import ClassifierAPI

    limits = Limits(settings.max_pixels, int(settings.max_body_mb * 2**20), settings.max_batch_images)
    routes = EndpointRoutes(name, alias, state_dir, limits, settings.timeout_s, secret)
    api = ClassifierAPI(name, state_dir, settings.max_batch_size, settings.batch_timeout, settings.warmup_iters,
                        token, routes, verbose)  # fmt: skip
    server = ls.LitServer(
        api,
        accelerator=settings.accelerator,
        workers_per_device=settings.workers,
        timeout=settings.timeout_s,
        restart_workers=True,  # a worker that dies (an engine's segfault) is replaced; the others keep serving
        disable_openapi_url=True,
    )

    async def protocol_error(request: Any, exc: HTTPException) -> JSONResponse:
        # the Open Inference Protocol's error body, for LitServe's and FastAPI's errors too (auth, unknown model)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    server.app.add_exception_handler(HTTPException, protocol_error)
    return server, len(server.devices) * settings.workers


def _secret(env: str | None, setting: str) -> str | None:
    if env is None:
        return None
    value = os.environ.get(env, "")
    if not value.strip():
        raise EndpointError(f"endpoint.{setting} names {env}, which is not set (or empty) in this environment")
    return value.strip()


def _start_failure(state_dir: Path, err: Exception) -> str:
    from vitops.flows.endpoint import state

    reasons = [w["failed"] for w in state.workers(state_dir).values() if w.get("failed")]
    if reasons:
        r = reasons[0]
        return f"version {r['version']} failed its {r['check']} check on this machine: {r['reason']}"
    return f"the inference workers did not start ({err}); run with -v for their log"


def _with(cfg: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(cfg, **changes)


def _interrupt(main_pid: int, signum: int) -> None:
    """SIGTERM (systemd's stop) as Ctrl+C in the main process: LitServe's graceful shutdown of its processes."""
    if os.getpid() != main_pid:  # a forked HTTP process that inherited this handler: the default, as uvicorn asks
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    signal.signal(signum, signal.SIG_IGN)  # one shutdown at a time
    raise KeyboardInterrupt
