"""`vitops endpoint NAME`: one registered model served over HTTP on LitServe, following an alias.

The processes of one endpoint, and why:

- this process (LitServe's main): checks the settings, makes the state folder (`state.py`) and the metrics
  folder, and runs LitServer. It never imports MLflow or a model: LitServe forks its HTTP processes from it;
- the first fetch and then the follower (`follower.py`), each in a spawned process: they talk to the registry;
- LitServe's inference workers (`worker.py`), spawned, `endpoint.workers` per device: each holds the served
  version and swaps it in place;
- LitServe's API servers (`routes.py`), forked, `endpoint.api_servers`: HTTP, decoding, checks, metrics, and
  the prediction log of every answer (`recorder.py`, one log per process, made after the fork);
- the shadow (`shadow.py`), spawned, at nice 19: scores the pilot in shadow off the response path, fed by a bounded
  queue made here before the fork (only when serving `champion`, the one alias that has a pilot beside it).

Stopping: Ctrl+C or SIGTERM ends LitServe's processes (each API server commits its log as it ends), then the
follower and the shadow, and removes the state folder; the verified downloads stay in `endpoint.cache_dir`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vitops.flows.config import EndpointParams, PilotParams, PredictionLogParams

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
    log_params: PredictionLogParams | None = None,
    pilot_params: PilotParams | None = None,
) -> None:
    """Serve `name@alias` on `host:port` until interrupted; with `champion`, pilot `pilot` beside it (shadow or
    canary, by the version's stage tag) and judge it by `pilot_params.online`. Every answer is logged to
    `log_params.dir`.

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
    log_settings = _log_settings(log_params or PredictionLogParams(), settings.station or socket.gethostname())
    pilot_params = pilot_params or PilotParams()
    if "prometheus_client" in sys.modules:
        raise EndpointError("prometheus_client was imported before the endpoint set PROMETHEUS_MULTIPROC_DIR")
    state_dir = Path(tempfile.mkdtemp(prefix="vitops-endpoint-"))
    (state_dir / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state_dir / "metrics")  # before any process imports the client
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in a service log
    follower_proc = shadow_proc = None
    try:
        from vitops.deploy.online_guardrails import OnlineRules
        from vitops.flows.endpoint import shadow
        from vitops.flows.endpoint.follower import FollowerConfig, first_version, follow
        from vitops.flows.endpoint.watch import PilotSettings

        pilot = PilotSettings(log_settings, OnlineRules.from_params(pilot_params.online),
                              pilot_params.online.check_every_s, pilot_params.canary_fraction)  # fmt: skip
        cfg = FollowerConfig(name, alias, settings.poll_s, settings.swap_timeout_s,
                             Path(settings.cache_dir).expanduser(), state_dir, 0, tracking_uri, verbose,
                             pilot if alias == "champion" else None)  # fmt: skip
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # MLflow stays out of the process LitServe forks
            serving = pool.submit(first_version, cfg).result()
        channel = None
        if alias == "champion":  # made before LitServe forks its API servers, which inherit it
            channel = shadow.ShadowChannel(name, settings.shadow_queue, ctx)
            shadow_cfg = shadow.ShadowConfig(name, state_dir, log_settings, settings.max_batch_size,
                                             settings.warmup_iters, settings.max_pixels, verbose)  # fmt: skip
            shadow_proc = ctx.Process(target=shadow.run, args=(shadow_cfg, channel.queue), name="vitops-shadow")
            shadow_proc.daemon = True
            shadow_proc.start()
        server, n_workers = _litserver(name, alias, state_dir, settings, token, secret, verbose, log_settings,
                                       channel)  # fmt: skip
        follower_proc = ctx.Process(target=follow, args=(_with(cfg, n_workers=n_workers),), name="vitops-follower")
        follower_proc.daemon = True
        follower_proc.start()
        auth = "bearer token required" if token else "no auth"
        piloted = " with @pilot beside it (shadow or canary, as its stage says)" if alias == "champion" else ""
        announce(
            f"vitops endpoint: {name}@{alias} = version {serving['version']}{piloted} on http://{host}:{port} "
            f"({auth}; {n_workers} worker(s), batches of up to {settings.max_batch_size}); follows @{alias} every "
            f"{settings.poll_s:g} s{' and on MLflow webhooks' if secret else ''}. Routes: /predict, /feedback, "
            f"/v2/models/{name}[/infer], /v2/health/ready, /metrics. Logs every answer to {log_settings.folder} "
            f"as station {log_settings.station}. Ctrl+C stops."
        )
        main_pid = os.getpid()
        signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt(main_pid, signum))
        logging.getLogger("litserve.server").addFilter(_quiet_stop)
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
            # LitServe's processes are gone; its worker-monitoring thread may still wake up and find its manager
            # shut down, a race of LitServe's own that it logs as a crash
            logging.getLogger("litserve.server").disabled = True
    finally:
        helpers = [p for p in (follower_proc, shadow_proc) if p is not None and p.is_alive()]
        for proc in helpers:
            proc.terminate()  # the shadow commits its log on SIGTERM
        for proc in helpers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


def _quiet_stop(record: logging.LogRecord) -> bool:
    """Drop LitServe's warning that an HTTP process it stops has already stopped: a stop signal reaches them first."""
    return "Already not alive" not in record.getMessage()


def _log_settings(params: PredictionLogParams, station: str) -> Any:
    from vitops.flows.endpoint.recorder import LogSettings

    folder = Path(params.dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EndpointError(f"prediction_log.dir {folder}: cannot create it ({err}); point it at a writable folder")
    if not os.access(folder, os.W_OK):
        raise EndpointError(f"prediction_log.dir {folder} is not writable by this user; point it at a writable folder")
    return LogSettings(folder, params.flush_s, params.keep_images, params.keep_below_confidence, station)


def _litserver(name: str, alias: str, state_dir: Path, settings: EndpointParams, token: str | None,
               secret: str | None, verbose: bool, log_settings: Any, channel: Any) -> tuple[Any, int]:  # fmt: skip
    import litserve as ls
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from vitops.deploy.image_input import Limits
    from vitops.flows.endpoint.recorder import Recorder
    from vitops.flows.endpoint.routes import EndpointRoutes
    from vitops.flows.endpoint.worker import ClassifierAPI

    limits = Limits(settings.max_pixels, int(settings.max_body_mb * 2**20), settings.max_batch_images)
    recorder = Recorder(name, log_settings, channel)
    routes = EndpointRoutes(name, alias, state_dir, limits, settings.timeout_s, secret, recorder)
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
