"""The API servers' side of the prediction log: every answer appended, images kept, the shadow fed.

LitServe forks its API servers from the endpoint's main process, and a `PredictionLog` must not cross a fork, so
each API server creates its own on its first answer (`Recorder.log`, keyed by the process id) and closes it, which
commits what is buffered, when the process ends cleanly. Between, its flush thread commits every
`prediction_log.flush_s`, so a SIGKILL of the whole endpoint loses at most that much.

An answer is recorded after it was sent (a Starlette background task): the client never waits for the log, an
image being kept, or the shadow. Per image it appends

- the answer, route `champion` or `canary`, with its version, engine, label, confidence, latency (arrival to
  answer), station, sha256 and request id;
- when a canary pilot failed on it, an error record of the pilot (same request id; the champion answered);

keeps the image (`images/<sha[:2]>/<sha>.<ext>`) when its hash falls in the `keep_images` sample or its answer's
confidence is below `keep_below_confidence`, and, while a pilot is in shadow, offers it to the shadow's queue
(`shadow.ShadowChannel.offer`: dropped and counted when the queue is full).
"""

from __future__ import annotations

import io
import logging
import multiprocessing.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitops.deploy.image_input import InputError
from vitops.deploy.prediction_log import Feedback, Prediction, PredictionLog, keep_image, should_keep

_log = logging.getLogger("vitops.endpoint")
STATION_HEADER = "x-vitops-station"
_STATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,99}")


@dataclass(frozen=True)
class LogSettings:
    """`prediction_log` and the station, as the API servers and the shadow process need them (picklable)."""

    folder: Path
    flush_s: float = 0.5
    keep_images: float = 0.05
    keep_below_confidence: float = 0.6
    station: str = ""


@dataclass(frozen=True)
class ShadowItem:
    """One image the champion answered, for the shadow (what crosses the queue)."""

    request_id: str
    sha256: str
    image: Any  # the encoded file (bytes) or the decoded H, W, 3 uint8 array of a tensor element
    suffix: str
    station: str
    pilot: str  # the pilot version the API server saw in shadow
    champion_version: str
    champion_label: str
    champion_confidence: float
    time: float  # when the champion answered


@dataclass
class Answered:
    """One answered request, as the recorder needs it: what each image was, and what the workers said."""

    time: float  # unix seconds when the answer was given
    latency_ms: float  # request arrival to answer
    station: str
    request_ids: list[str]
    sha256: list[str]
    images: list[np.ndarray]  # decoded, H, W, 3 uint8
    files: list[bytes | None]  # the encoded file of each image; None for a UINT8 tensor element
    out: dict[str, Any]  # the worker's answer (routes.py `_run`)
    shadow: dict[str, Any] | None = None  # the pilot in shadow, when one is


def check_station(value: str) -> str:
    """A station id from the `X-Vitops-Station` header: 1-100 characters, letters, digits and `._:@/-`."""
    if not _STATION.fullmatch(value):
        raise InputError(f"X-Vitops-Station {value[:40]!r} is not a station id: use letters, digits and ._:@/- "
                         "(at most 100 characters)")  # fmt: skip
    return value


def suffix_of(data: bytes | None) -> str:
    """The file extension of an encoded image (PNG or JPEG, by its magic bytes); `.png` for a tensor element."""
    if data is not None and data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".png"


def encoded(image: np.ndarray, data: bytes | None) -> bytes:
    """The bytes to keep of an image: its file as sent, or a PNG of a tensor element (lossless)."""
    if data is not None:
        return data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def feedback_items(doc: Any, classes: list[str]) -> list[tuple[str, str, str]]:
    """Checked `(sha256, label, operator)` of a feedback body (an object or a list of them), else InputError."""
    records = doc if isinstance(doc, list) else [doc]
    if not records:
        raise InputError('the feedback list is empty: send {"sha256", "label", "operator"} objects')
    items = []
    for n, item in enumerate(records):
        what = f"feedback[{n}]" if isinstance(doc, list) else "feedback"
        if not isinstance(item, dict):
            raise InputError(f"{what} is not an object with sha256, label and operator")
        sha, label, operator = item.get("sha256"), item.get("label"), item.get("operator")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
            raise InputError(f"{what}: sha256 {sha!r} is not 64 hex digits: send the sha256 the answer named")
        if label not in classes:
            raise InputError(f"{what}: label {label!r} is not one of the served classes {', '.join(classes)}")
        if not isinstance(operator, str) or not operator.strip() or len(operator) > 200:
            raise InputError(f"{what}: operator {operator!r} must name who judged the image (1-200 characters)")
        items.append((sha.lower(), label, operator.strip()))
    return items


class Recorder:
    """The prediction log of one API server, created after the fork on first use."""

    def __init__(self, name: str, settings: LogSettings, shadow: Any = None) -> None:
        self.name, self.settings, self.shadow = name, settings, shadow
        self._log: PredictionLog | None = None
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        # the LitAPI (and this with it) is pickled into the spawned inference workers, which log nothing
        return self.__dict__ | {"_log": None, "_pid": 0, "shadow": None}

    def log(self) -> PredictionLog:
        """This process's log (a new one after a fork); committed and closed when the process ends cleanly."""
        if self._log is None or self._pid != os.getpid():
            self._log = PredictionLog(self.settings.folder, self.settings.flush_s)
            self._pid = os.getpid()
            # a forked multiprocessing child ends with os._exit, which skips atexit: its finalizers still run
            multiprocessing.util.Finalize(self._log, self._log.close, exitpriority=10)
        return self._log

    async def record(self, answered: Answered) -> None:
        """Append the answers of one request, keep its images as configured, and feed the shadow."""
        try:
            await self._record(answered)
        except Exception as err:  # after the answer was sent: say so in the log, never as a traceback to nobody
            _log.error("prediction log: could not record request %s: %s", answered.request_ids[:1], err)

    async def _record(self, answered: Answered) -> None:
        from starlette.concurrency import run_in_threadpool

        keep = self._to_keep(answered)
        if keep:
            paths = await run_in_threadpool(self._keep, answered, keep)
        else:
            paths = {}
        plog = self.log()
        out = answered.out
        for i, sha in enumerate(answered.sha256):
            rid = answered.request_ids[i]
            error = out["pilot_errors"].get(i)
            if error is not None:
                plog.append(Prediction(
                    answered.time, rid, sha, self.name, out["pilot_version"], out["pilot_engine"], None, None,
                    answered.latency_ms, "canary", answered.station, status="error", error=error[:2000],
                ))  # fmt: skip
            plog.append(Prediction(
                answered.time, rid, sha, self.name, out["versions"][i], out["engines"][i], out["labels"][i],
                float(out["confidence"][i]), answered.latency_ms, out["routes"][i], answered.station,
                image=paths.get(i, ""),
            ))  # fmt: skip
        if answered.shadow and self.shadow is not None:
            self._offer(answered)

    def feedback(self, items: list[tuple[str, str, str]], station: str, now: float) -> None:
        """Append operators' verdicts `(sha256, label, operator)` and commit them before returning."""
        plog = self.log()
        for sha, label, operator in items:
            plog.append_feedback(Feedback(now, sha, label, operator, "api", station))
        plog.flush()

    def _to_keep(self, answered: Answered) -> list[int]:
        s = self.settings
        return [
            i
            for i, sha in enumerate(answered.sha256)
            if should_keep(sha, s.keep_images) or float(answered.out["confidence"][i]) < s.keep_below_confidence
        ]

    def _keep(self, answered: Answered, indexes: list[int]) -> dict[int, str]:
        paths = {}
        for i in indexes:
            data = answered.files[i]
            try:
                paths[i] = keep_image(self.settings.folder, answered.sha256[i], encoded(answered.images[i], data),
                                      suffix_of(data))  # fmt: skip
            except Exception as err:  # a full disk must not lose the record itself
                _log.error("cannot keep image %s: %s", answered.sha256[i], err)
        return paths

    def _offer(self, answered: Answered) -> None:
        pilot, out = answered.shadow or {}, answered.out
        for i, sha in enumerate(answered.sha256):
            if out["routes"][i] != "champion":
                continue
            data = answered.files[i]
            self.shadow.offer(ShadowItem(
                answered.request_ids[i], sha, data if data is not None else answered.images[i], suffix_of(data),
                answered.station, pilot["version"], out["versions"][i], out["labels"][i],
                float(out["confidence"][i]), answered.time,
            ))  # fmt: skip
