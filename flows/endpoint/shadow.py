"""The shadow: the pilot scores the images the champion answered, off the response path, in a process of its own.

While the version holding `pilot` is in its shadow stage (`target.json` `pilot.stage == "shadow"`), each API server
offers every image the champion answered to a bounded queue (`ShadowChannel.offer`, after the answer was sent,
with `put_nowait`): when the queue is full the image is dropped and counted, so the champion's answer is never
delayed by the shadow. This process

- runs at the lowest CPU priority (`nice 19`, and Linux's `SCHED_IDLE` policy, so a champion's process that wakes
  up takes the core from it at once), pinned to one core, with one torch/OpenMP thread: under contention the
  champion's workers get the CPU;
- loads the pilot as the workers load a version (`served.load_checked`), drops it when the stage ends or a
  guardrail stops it, and drops queued images meant for another pilot version;
- scores what is queued in batches of up to `endpoint.max_batch_size`, and appends one `shadow` record per image
  to the prediction log, with the champion's label and confidence for the same request (its request id), its
  own latency (dequeue to answer), and the image kept when the two disagree or the pilot is unsure;
- writes `shadow.json` in the state folder (version held, images scored, failed, dropped) for
  `GET /v2/models/NAME`.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the shadow process only after it limited its threads (numpy reads them at import)
    from vitops.flows.endpoint.recorder import ShadowItem

log = logging.getLogger("vitops.endpoint")


@dataclass(frozen=True)
class ShadowConfig:
    """What the shadow process needs (picklable: it is handed to a spawned process)."""

    name: str
    state_dir: Path
    log: Any  # recorder.LogSettings
    max_batch_size: int = 8
    warmup_iters: int = 1
    max_pixels: int = 16_000_000
    verbose: bool = False


class ShadowChannel:
    """The bounded queue between the API servers and the shadow process, with the count of dropped images.

    Made in the endpoint's main process before LitServe forks its API servers, which inherit it."""

    def __init__(self, name: str, size: int, ctx: Any) -> None:
        self.name, self.size = name, size
        self.queue = ctx.Queue(size)
        self.dropped = ctx.Value("q", 0)
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("the shadow channel is inherited by forked API servers, never pickled")

    def offer(self, item: ShadowItem) -> bool:
        """Queue an image for the shadow without waiting; False (dropped, counted) when the queue is full."""
        from vitops.flows.endpoint import metrics

        try:
            self.queue.put_nowait(item)
        except queue.Full:
            with self.dropped.get_lock():
                self.dropped.value += 1
            metrics.SHADOW_DROPPED.labels(self.name, "full").inc()
            return False
        if self._pid != os.getpid():
            # a stopping API server must not wait for its feeder thread to hand the last images to a busy shadow
            self.queue.cancel_join_thread()
            self._pid = os.getpid()
        return True

    def counts(self) -> dict[str, int]:
        """Images waiting now, the queue's size, and images dropped because it was full (all API servers)."""
        try:
            queued = self.queue.qsize()
        except NotImplementedError:  # macOS has no sem_getvalue
            queued = -1
        return {"queued": queued, "capacity": self.size, "dropped_full": int(self.dropped.value)}


def run(cfg: ShadowConfig, items: Any) -> None:
    """The shadow process's body: follow the pilot, score what is queued, log it; until SIGTERM."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    os.nice(19)
    if hasattr(os, "SCHED_IDLE"):  # Linux: runs only on CPU time nobody else wants; a waking worker preempts it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]})  # every engine thread of the shadow shares one core
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the main process stops us
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    from vitops.flows.endpoint.follower import configure_logging

    configure_logging(cfg.verbose)
    from vitops.deploy.prediction_log import PredictionLog

    plog = PredictionLog(cfg.log.folder, cfg.log.flush_s)
    shadow = _Shadow(cfg, plog)
    try:
        while not stop.is_set():
            try:
                batch = [items.get(timeout=0.1)]
            except queue.Empty:
                shadow.follow()
                continue
            while len(batch) < cfg.max_batch_size:
                try:
                    batch.append(items.get_nowait())
                except queue.Empty:
                    break
            shadow.follow()
            shadow.score(batch)
    finally:
        shadow.status(force=True)
        plog.close()


class _Shadow:
    """The pilot held in the shadow process, and what it did."""

    def __init__(self, cfg: ShadowConfig, plog: Any) -> None:
        self.cfg, self.plog = cfg, plog
        self.pilot: Any = None
        self.refused: dict[str, dict[str, str]] = {}
        self.counts = {"scored": 0, "failed": 0, "dropped_not_loaded": 0}
        self._written_at = 0.0
        self._last: dict[str, Any] = {}

    def follow(self) -> None:
        """Load the pilot while its stage is shadow; drop it otherwise. Read before every batch (and every 0.1 s
        when idle), so a pilot that a guardrail stopped scores at most the batch in hand."""
        from vitops.flows.endpoint import state
        from vitops.flows.endpoint.served import CheckFailed, load_checked

        pilot = state.read(state.target_file(self.cfg.state_dir)).get("pilot") or {}
        want = pilot.get("version") if pilot.get("stage") == "shadow" else None
        held = self.pilot.version if self.pilot is not None else None
        if want != held and want not in self.refused:
            self.pilot = None
            if want is not None:
                try:
                    self.pilot = load_checked(self.cfg.name, want, pilot["path"], self.cfg.warmup_iters,
                                              self.cfg.max_batch_size)  # fmt: skip
                    log.info("shadow: %s version %s (%s) scores what the champion answers, at nice 19",
                             self.cfg.name, want, self.pilot.engine)  # fmt: skip
                except CheckFailed as err:
                    self.refused[want] = {"version": want, "check": err.check, "reason": err.reason}
                    log.error("shadow: %s pilot version %s failed its %s check: %s", self.cfg.name, want, err.check,
                              err.reason)  # fmt: skip
            elif held is not None:
                log.info("shadow: %s version %s is no longer in shadow", self.cfg.name, held)
            self.status(force=True)
        self.status()

    def score(self, batch: list[ShadowItem]) -> None:
        """Score the images meant for the pilot held; log each answer (or the failure) with the champion's."""
        from vitops.deploy.image_input import decode_image
        from vitops.flows.endpoint import metrics

        start = time.time()
        pilot = self.pilot
        mine = [item for item in batch if pilot is not None and item.pilot == pilot.version]
        if len(mine) < len(batch):
            self.counts["dropped_not_loaded"] += len(batch) - len(mine)
            metrics.SHADOW_DROPPED.labels(self.cfg.name, "not_loaded").inc(len(batch) - len(mine))
        if not mine:
            return
        try:
            images = [decode_image(i.image, self.cfg.max_pixels) if isinstance(i.image, bytes) else i.image
                      for i in mine]  # fmt: skip
            result = pilot.run(images)
            error = ""
        except Exception as err:  # logged as the pilot's failure: the online guardrails count them
            images, result, error = [], None, f"{type(err).__name__}: {err}"
        now = time.time()
        latency_ms = (now - start) * 1000.0
        for row, item in enumerate(mine):
            self._log(item, pilot, result, row, images, error, now, latency_ms)
        status = "error" if error else "ok"
        self.counts["failed" if error else "scored"] += len(mine)
        metrics.SHADOW_SCORED.labels(self.cfg.name, pilot.version, status).inc(len(mine))
        metrics.SHADOW_SECONDS.observe(latency_ms / 1000.0)
        self.status()

    def _log(self, item: ShadowItem, pilot: Any, result: Any, row: int, images: list, error: str, now: float,
             latency_ms: float) -> None:  # fmt: skip
        from vitops.deploy.prediction_log import Prediction, keep_image
        from vitops.flows.endpoint.recorder import encoded

        common = dict(time=now, request_id=item.request_id, sha256=item.sha256, model=self.cfg.name,
                      version=pilot.version, engine=pilot.engine, latency_ms=latency_ms, route="shadow",
                      station=item.station, champion_label=item.champion_label,
                      champion_confidence=item.champion_confidence)  # fmt: skip
        if error:
            self.plog.append(Prediction(**common, label=None, confidence=None, status="error", error=error[:2000]))
            return
        label, confidence = result.labels[row], float(result.confidence[row])
        path = ""
        if label != item.champion_label or confidence < self.cfg.log.keep_below_confidence:
            try:
                data = item.image if isinstance(item.image, bytes) else None
                path = keep_image(self.cfg.log.folder, item.sha256, encoded(images[row], data), item.suffix)
            except Exception as err:  # a full disk must not lose the record itself
                log.error("shadow: cannot keep image %s: %s", item.sha256, err)
        self.plog.append(Prediction(**common, label=label, confidence=confidence, image=path))

    def status(self, force: bool = False) -> None:
        """Publish `shadow.json` (at most twice a second unless forced)."""
        from vitops.flows.endpoint import state

        now = time.monotonic()
        if not force and now - self._written_at < 0.5:
            return
        held = self.pilot
        current = {
            "pid": os.getpid(),
            "version": held.version if held is not None else None,
            "engine": held.engine if held is not None else None,
            "refused": list(self.refused.values())[-1:] or None,
            **self.counts,
        }
        if force or current != self._last:
            state.write(state.shadow_file(self.cfg.state_dir), current)
            self._last = current
        self._written_at = now
