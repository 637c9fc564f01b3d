"""The endpoint's HTTP routes: a LitServe spec (as LitServe's own OpenAI spec is) whose handlers run in the API
server processes.

Every handler reads the body under `endpoint.max_body_mb`, decodes and checks the images there (in a thread, off
the event loop), and only then queues the decoded images for a worker: a bad request is answered 4xx at once
and never shares a batch with other clients' requests. Routes:

- `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/NAME[/versions/V]`, `/v2/models/NAME/ready`,
  `POST /v2/models/NAME[/versions/V]/infer`: the Open Inference Protocol (`deploy.oip`);
- `POST /predict`: one PNG or JPEG as the raw body or as the one file of a multipart form, answered
  `{label, confidence, probabilities, version, engine, sha256, request_id, route}`;
- `POST /feedback`: operators' verdicts, `{"sha256", "label", "operator"}` or a list of them, appended to the
  prediction log (committed before the answer);
- `GET /metrics`: Prometheus, all processes together (`metrics.py`);
- `POST /v2/webhooks/mlflow` (when `endpoint.webhook_secret_env` is set): MLflow's model-registry webhook; a
  valid signature wakes the follower, which then reads the alias from the registry itself (the webhook's body
  is a hint, never trusted to name a version).

With a token, every route but the health routes and the webhook needs `Authorization: Bearer <token>`.

The pilot: while the version holding `pilot` is in canary (`target.json`), each image whose sha256
`routes_to_candidate` sends to it is marked for it (the worker answers it with the pilot if it holds that version);
while it is in shadow, every image the champion answered is offered to the shadow's queue after the answer. Every
answer is recorded in the prediction log after it was sent (`recorder.py`); the station is `endpoint.station`, or
the request's `X-Vitops-Station` header.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from vitops.deploy import oip
from vitops.deploy.guardrails import routes_to_candidate
from vitops.deploy.image_input import InputError, Limits, check_body_size, decode_image, image_content_type
from vitops.flows.endpoint import metrics, state
from vitops.flows.endpoint.recorder import STATION_HEADER, Answered, Recorder, check_station, feedback_items

log = logging.getLogger("vitops.endpoint")
WEBHOOK = "/v2/webhooks/mlflow"
OPEN_ROUTES = ("/", "/health", "/v2/health/live", "/v2/health/ready", WEBHOOK)
WEBHOOK_TOLERANCE_S = 300  # Standard Webhooks' replay window, which MLflow's signing follows


def check_token(request: Request, token: str | None) -> None:
    """Refuse a request without the bearer token (401), unless there is no token or the route is open."""
    if not token or request.url.path in OPEN_ROUTES:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise HTTPException(
            401, "missing or wrong bearer token: send `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip


def webhook_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's webhook signature: `v1,` + base64 HMAC-SHA256 of `<delivery id>.<timestamp>.<body>`."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


class EndpointRoutes(LitSpec):
    """The routes of one served model."""

    def __init__(self, name: str, alias: str, state_dir: Path, limits: Limits, timeout_s: float,
                 webhook_secret: str | None = None, recorder: Recorder | None = None) -> None:  # fmt: skip
        super().__init__()
        self.name, self.alias, self.state_dir, self.limits = name, alias, Path(state_dir), limits
        self.timeout_s, self.webhook_secret, self.recorder = timeout_s, webhook_secret, recorder
        self._snapshot_at, self._snapshot = 0.0, {}
        self.api_path = "/predict"  # LitServe's name for this spec's queue
        for path, handler, methods in [
            ("/v2", self.server_metadata, ["GET"]),
            ("/v2/health/live", self.live, ["GET"]),
            ("/v2/health/ready", self.ready, ["GET"]),
            ("/v2/models/{model}", self.model_metadata, ["GET"]),
            ("/v2/models/{model}/ready", self.model_ready, ["GET"]),
            ("/v2/models/{model}/versions/{version}", self.model_metadata, ["GET"]),
            ("/v2/models/{model}/infer", self.infer, ["POST"]),
            ("/v2/models/{model}/versions/{version}/infer", self.infer, ["POST"]),
            ("/predict", self.predict, ["POST"]),
            ("/feedback", self.feedback, ["POST"]),
            ("/metrics", self.metrics, ["GET"]),
        ]:
            self.add_endpoint(path, handler, methods)
        if webhook_secret:
            self.add_endpoint(WEBHOOK, self.webhook, ["POST"])

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    # -- the protocol -------------------------------------------------------------------------------------------

    async def server_metadata(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"name": "vitops", "version": version("vitops"), "extensions": []}

    async def live(self) -> dict[str, bool]:
        return {"live": True}

    async def ready(self) -> Response:
        ok = bool(self._serving())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_ready(self, model: str) -> Response:
        self._check_model(model)
        return await self.ready()

    async def model_metadata(self, model: str, version: str | None = None) -> Response:
        """The protocol's metadata plus what a station operator asks: engine, classes, where the alias points,
        what each worker serves, and the last version refused with the check it failed."""
        self._check_model(model)
        snap = self._read_state()
        serving = self._serving()
        if not serving:
            return _error(503, f"{self.name} is not loaded yet")
        if version is not None and version != serving["version"]:
            return _error(404, f"version {version} of {self.name} is not served here (serving {serving['version']})")
        follower = snap["follower"]
        candidate = snap["target"].get("candidate")
        body = oip.model_metadata(self.name, serving["version"], serving["engine"], serving["classes"],
                                  serving["img_size"])  # fmt: skip
        body |= {
            "alias": self.alias,
            "version": serving["version"],
            "engine": serving["engine"],
            "workers": [
                {"id": i, "pid": w.get("pid"), "version": w.get("version"), "engine": w.get("engine")}
                for i, w in sorted(snap["workers"].items())
            ],  # fmt: skip
            "registry": {k: follower.get(k) for k in ("registry_version", "registry_error", "checked_at", "poll_s")},
            "checking": candidate and {"version": candidate["version"], "phase": candidate["phase"]},
            "refused": follower.get("refused"),
            "pilot": self._pilot_view(snap),
        }
        return JSONResponse(body)

    async def infer(self, model: str, request: Request, version: str | None = None) -> Response:
        start = time.perf_counter()
        try:
            self._check_model(model)
            body = await self._body(request)
            if _media(request) != "application/json":
                raise InputError(f"an infer request is JSON: send Content-Type application/json, not "
                                 f"{_media(request) or 'none'}", 415)  # fmt: skip
            station = self._station(request)
            parsed = await run_in_threadpool(self._parse_infer, body)
            out = await self._run(parsed.images, version, parsed.sha256)
            answered = self._answered(start, station, parsed.sha256, parsed.images, parsed.files, out)
            answers = oip.Answers(out["labels"], out["confidence"], out["probabilities"])
            parameters = {"sha256": parsed.sha256, "request_id": answered.request_ids, "route": out["routes"],
                          "version": out["versions"]}  # fmt: skip
            response = oip.infer_response(self.name, out["version"], parsed, answers, parameters)
            return self._answer("infer", start, self._respond(response, answered), out["version"], out["engine"])
        except InputError as err:
            return self._answer("infer", start, _error(err.status, str(err)))

    async def predict(self, request: Request) -> Response:
        """One image: the raw body (image/png or image/jpeg) or the one file of a multipart form."""
        start = time.perf_counter()
        try:
            station = self._station(request)
            data = await self._image_bytes(request)
            sha = hashlib.sha256(data).hexdigest()
            image = await run_in_threadpool(decode_image, data, self.limits.max_pixels, "the image")
            out = await self._run([image], None, [sha])
            answered = self._answered(start, station, [sha], [image], [data], out)
            probs = out["probabilities"][0]
            body = {
                "label": out["labels"][0],
                "confidence": float(out["confidence"][0]),
                "probabilities": {c: float(p) for c, p in zip(out["classes"], probs, strict=True)},
                "version": out["versions"][0],
                "engine": out["engines"][0],
                "sha256": sha,
                "request_id": answered.request_ids[0],
                "route": out["routes"][0],
            }
            response = self._respond(body, answered)
            return self._answer("predict", start, response, out["versions"][0], out["engines"][0])
        except InputError as err:
            return self._answer("predict", start, _error(err.status, str(err)))

    async def feedback(self, request: Request) -> Response:
        """Operators' verdicts: `{"sha256": ..., "label": ..., "operator": ...}` or a list of them, each label one of
        the served classes; appended to the prediction log and committed before the answer."""
        try:
            station = self._station(request)
            body = await self._body(request)
            if _media(request) != "application/json":
                raise InputError("feedback is JSON: send Content-Type application/json", 415)
            try:
                doc = json.loads(body)
            except ValueError as err:
                raise InputError(f"the body is not JSON: {err}") from None
            serving = self._serving()
            if not serving:
                raise InputError(f"{self.name} is not loaded yet", 503)
            items = feedback_items(doc, serving["classes"])
            if self.recorder is None:
                raise InputError("this endpoint keeps no prediction log", 503)
            try:
                await run_in_threadpool(self.recorder.feedback, items, station, time.time())
            except ValueError as err:  # LogError: the log cannot commit now
                raise InputError(f"feedback not recorded: {err}", 503) from None
            return JSONResponse({"accepted": len(items)})
        except InputError as err:
            return _error(err.status, str(err))

    async def metrics(self) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def webhook(self, request: Request) -> Response:
        """MLflow's `model_version_alias.created` (or `.deleted`) for this model and alias wakes the follower."""
        try:
            body = await self._body(request)
        except InputError as err:
            return _error(err.status, str(err))
        delivery = request.headers.get("x-mlflow-delivery-id")
        stamp = request.headers.get("x-mlflow-timestamp", "")
        signatures = request.headers.get("x-mlflow-signature", "").split()
        if not delivery or not stamp.isdigit() or not signatures:
            return _error(400, "not an MLflow webhook: X-MLflow-Delivery-Id, -Timestamp and -Signature are required")
        if abs(time.time() - int(stamp)) > WEBHOOK_TOLERANCE_S:
            return _error(401, f"webhook timestamp {stamp} is more than {WEBHOOK_TOLERANCE_S} s from this clock")
        expected = webhook_signature(self.webhook_secret or "", delivery, stamp, body)
        if not any(hmac.compare_digest(s.encode(), expected.encode()) for s in signatures):
            log.warning("refused a webhook with a bad signature (delivery %s)", delivery)
            return _error(401, "bad webhook signature: check that the webhook's secret is the endpoint's")
        try:
            event = json.loads(body)
            data = event.get("data") or {}
            watched = (self.alias, "pilot") if self.alias == "champion" else (self.alias,)
            entity, ours = event.get("entity"), data.get("name") == self.name
            if entity == "model_version_alias":
                ours = ours and data.get("alias") in watched
            else:  # the pilot flow's stage tags: a new stage starts at once
                ours = ours and entity == "model_version_tag" and "pilot" in watched
                ours = ours and str(data.get("key", "")).startswith("pilot.")
        except (ValueError, AttributeError):
            return _error(400, "the webhook's body is not an MLflow event")
        if ours:
            state.wake(self.state_dir)
            log.info("webhook: %s %s %s; reading the registry now", self.name, entity, event.get("action"))
        return JSONResponse({"accepted": bool(ours)})

    # -- helpers ------------------------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise HTTPException(404, f"unknown model {model!r}: this endpoint serves {self.name!r}")

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            check_body_size(int(declared), self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            check_body_size(size, self.limits)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _image_bytes(self, request: Request) -> bytes:
        body = await self._body(request)
        if _media(request) != "multipart/form-data":
            image_content_type(request.headers.get("content-type"))
            return body

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as err:  # starlette's MultiPartException, python-multipart's errors
            raise InputError(f"unreadable multipart body: {err}") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if len(files) != 1:
            raise InputError(f"send exactly one file part per /predict (got {len(files)}); "
                             f"for batches use /v2/models/{self.name}/infer")  # fmt: skip
        return await files[0].read()

    def _parse_infer(self, body: bytes) -> oip.InferRequest:
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise InputError(f"the body is not JSON: {err}") from None
        return oip.parse_infer_request(doc, self.limits)

    async def _run(self, images: list[Any], version: str | None, hashes: list[str]) -> dict[str, Any]:
        """Queue decoded images for a worker and wait for its answer (504 past `timeout_s`). In a canary, the images
        that `routes_to_candidate` picks by their hash are marked for the pilot (unless a version was asked for)."""
        uid = str(uuid.uuid4())
        event = asyncio.Event()
        payload: dict[str, Any] = {"images": images, "version": version}
        pilot = self._pilot()
        if version is None and pilot and pilot.get("stage") == "canary":
            fraction = float(pilot.get("fraction") or 0.0)
            payload |= {"pilot": pilot["version"], "canary": [routes_to_candidate(h, fraction) for h in hashes]}
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
        try:
            await asyncio.wait_for(event.wait(), self.timeout_s)
        except TimeoutError:
            self.response_buffer.pop(uid, None)
            raise InputError(f"no answer within endpoint.timeout_s ({self.timeout_s} s)", 504) from None
        response, status = self.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR or not isinstance(response, dict):
            log.error("inference failed: %r", response)
            raise InputError("inference failed on the server; see its log", 500)
        if "error" in response:
            raise InputError(response["error"], response["status"])
        return response

    def _answered(self, start: float, station: str, hashes: list[str], images: list[Any], files: list[Any],
                  out: dict[str, Any]) -> Answered:  # fmt: skip
        """What the recorder needs of an answer, with a request id per image; counts the answers by route."""
        for route, version in zip(out["routes"], out["versions"], strict=True):
            metrics.ROUTED.labels(self.name, version, route).inc()
        for _ in out["pilot_errors"]:
            metrics.PILOT_ERRORS.labels(self.name, out["pilot_version"], "canary").inc()
        pilot = self._pilot()
        shadow = pilot if pilot and pilot.get("stage") == "shadow" else None
        return Answered(time.time(), (time.perf_counter() - start) * 1000.0, station,
                        [uuid.uuid4().hex for _ in hashes], hashes, images, files, out, shadow)  # fmt: skip

    def _respond(self, body: dict[str, Any], answered: Answered) -> Response:
        """The answer, with its recording (log, kept images, shadow) run after it was sent."""
        task = BackgroundTask(self.recorder.record, answered) if self.recorder is not None else None
        return JSONResponse(body, background=task)

    def _station(self, request: Request) -> str:
        header = request.headers.get(STATION_HEADER)
        if header is not None:
            return check_station(header.strip())
        return self.recorder.settings.station if self.recorder is not None else ""

    def _answer(self, route: str, start: float, response: Response, version: str | None = None,
                engine: str | None = None) -> Response:  # fmt: skip
        serving = self._serving() or {}
        version = version or serving.get("version", "")
        engine = engine or serving.get("engine", "")
        metrics.REQUESTS.labels(self.name, version, engine, route).inc()
        if response.status_code >= 400:
            metrics.ERRORS.labels(self.name, version, engine, route, str(response.status_code)).inc()
        metrics.LATENCY.labels(route).observe(time.perf_counter() - start)
        return response

    def _read_state(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._snapshot_at > 0.25:  # many requests, one read of the state folder
            self._snapshot = {
                "target": state.read(state.target_file(self.state_dir)),
                "follower": state.read(state.follower_file(self.state_dir)),
                "workers": state.workers(self.state_dir),
                "shadow": state.read(state.shadow_file(self.state_dir)),
            }
            self._snapshot_at = now
        return self._snapshot

    def _serving(self) -> dict[str, Any] | None:
        """What the workers serve: the committed version as the first worker that switched to it reports it."""
        snap = self._read_state()
        want = (snap["target"].get("serving") or {}).get("version")
        live = [w for _, w in sorted(snap["workers"].items()) if w.get("version")]
        return next((w for w in live if w["version"] == want), live[0] if live else None)

    def _pilot(self) -> dict[str, Any] | None:
        """The pilot beside the champion (`target.json`): version, path, stage, fraction; None when there is none."""
        return self._read_state()["target"].get("pilot")

    def _pilot_view(self, snap: dict[str, Any]) -> dict[str, Any]:
        """`GET /v2/models/NAME`'s `pilot`: the version, stage and fraction, who holds it, the shadow's queue, and the
        last guardrail breach."""
        pilot = snap["target"].get("pilot") or {}
        shadow = snap["shadow"]
        view: dict[str, Any] = {k: pilot.get(k) for k in ("version", "stage", "fraction", "since")}
        view["workers"] = [w.get("pilot_version") for _, w in sorted(snap["workers"].items())]
        view["failed"] = next((w["pilot_failed"] for w in snap["workers"].values() if w.get("pilot_failed")), None)
        channel = self.recorder.shadow if self.recorder is not None else None
        view["shadow"] = {
            "version": shadow.get("version"),
            "scored": shadow.get("scored", 0),
            "failed": shadow.get("failed", 0),
            "dropped_not_loaded": shadow.get("dropped_not_loaded", 0),
            "refused": shadow.get("refused"),
            **(channel.counts() if channel is not None else {}),
        }
        view["guardrails"] = snap["follower"].get("guardrails")
        view["breach"] = snap["follower"].get("breach")
        return view


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
