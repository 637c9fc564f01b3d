"""The inference side of the endpoint: a LitServe `LitAPI` whose worker processes hold the served version, switch
to the next one without dropping a request, and, in a canary, hold the pilot beside it.

LitServe runs `setup` and `predict` in worker processes that it spawns, and HTTP in other processes, so the swap
happens here, where the model lives. Each worker

- loads the `serving` version of `target.json` in `setup` and checks it (`served.load_checked`) before it reports
  ready;
- runs a watcher thread that stages a `candidate` (loads it beside the served version, predicts the input
  example through both the pyfunc model and this endpoint's own path and requires the same answers, then warms
  it up at batch 1 and at a full batch), reports the result, and switches when the follower names the
  candidate `serving`: one assignment, between two batches;
- loads the `pilot` of `target.json` the same way while its stage is `canary` (dropping it when the stage ends
  or a guardrail stops it), and reports `pilot_version`;
- answers a batch with the versions it read when the batch began, so a request finishes on the version that
  accepted it, and every answer names its route, version and engine.

Canary routing: the API server marks each image that `routes_to_candidate` sends to the pilot (by its content
hash) with the pilot version it expects; the worker answers it with the pilot only if it holds exactly that
version, else with the champion (route `champion`). A pilot that raises leaves its images to the champion, and
the answer carries the pilot's error for the log.

Inference is the pyfunc model's own: `ImageClassifier.preprocess` on each image, `logits` on the engine the
pyfunc model chose on this machine, and the pyfunc model's softmax (`deploy.oip.answers`); so answers equal
`pyfunc.predict` on the same images. Requests arrive decoded and checked by the API servers (`routes.py`), so
a bad image never reaches a batch that other clients' requests share.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request

from vitops.flows.endpoint import state
from vitops.flows.endpoint.follower import configure_logging
from vitops.flows.endpoint.served import CheckFailed, Served, load_checked

log = logging.getLogger("vitops.endpoint")


class ClassifierAPI(ls.LitAPI):
    """Serves one registered model from the versions the follower names in the state folder."""

    def __init__(self, name: str, state_dir: Path, max_batch_size: int, batch_timeout: float, warmup_iters: int,
                 token: str | None = None, routes: Any = None, verbose: bool = False) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=routes)
        self.name, self.state_dir, self.warmup_iters, self.verbose = name, Path(state_dir), warmup_iters, verbose
        self.token = token

    # -- in the API servers -----------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """LitServe's auth hook, on every route: a bearer token unless the route is open (health, webhook)."""
        from vitops.flows.endpoint.routes import check_token

        check_token(request, self.token)

    # -- in the workers -----------------------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        """Load and check the served version, then start watching for the next one (and for a canary pilot)."""
        # Ctrl-C in a terminal reaches the whole process group: LitServe's main process stops the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        configure_logging(self.verbose)
        if str(device).startswith("cuda:"):  # engines see only this worker's GPU (LitServe counts the visible ones)
            index = int(str(device).split(":", 1)[1])
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
        self.worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self._status: dict[str, Any] = {"pid": os.getpid(), "staged": None, "pilot_version": None}
        self._pilot: Served | None = None
        target = state.read(state.target_file(self.state_dir))["serving"]
        try:
            self._served = self._load_checked(target["version"], target["path"])
        except CheckFailed as err:
            self._report(failed={"version": target["version"], "check": err.check, "reason": err.reason})
            raise RuntimeError(f"version {target['version']} failed its {err.check} check: {err.reason}") from None
        self._switch(self._served, None)
        log.info("worker %d (pid %d) serves %s version %s with %s", self.worker_id, os.getpid(), self.name,
                 self._served.version, self._served.engine)  # fmt: skip
        threading.Thread(target=self._watch, name="vitops-version-watcher", daemon=True).start()

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        return request  # decoded and checked in the API server

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output

    def predict(self, x: Any, **kwargs: Any) -> Any:
        """Answer a batch of requests (one request when batching is off) on the versions held when it began."""
        served, pilot = self._served, self._pilot  # one read each: the batch runs on these, whatever the watcher does
        if pilot is not None and pilot.classes != served.classes:
            pilot = None  # answers of both go into one [N, C] tensor: never mix models of other classes
        payloads = x if self.max_batch_size > 1 else [x]
        out: list[dict[str, Any]] = []
        jobs: dict[str, list[tuple[int, int, np.ndarray]]] = {"champion": [], "canary": []}
        for k, payload in enumerate(payloads):
            want = payload.get("version")
            if want is not None and want != served.version:
                out.append({"status": 404, "error": f"version {want} of {self.name} is not served here "
                            f"(serving {served.version})"})  # fmt: skip
                continue
            images, canary = payload["images"], payload.get("canary") or ()
            ours = pilot is not None and payload.get("pilot") == pilot.version
            out.append(_empty(served, len(images), pilot if ours else None))
            for i, img in enumerate(images):
                jobs["canary" if ours and i < len(canary) and canary[i] else "champion"].append((k, i, img))
        if jobs["canary"]:
            assert pilot is not None
            try:
                self._answer(pilot, jobs["canary"], out, "canary")
            except Exception as err:  # the champion answers instead; the answer carries the error for the log
                log.error("%s pilot version %s failed on %d image(s): %s", self.name, pilot.version,
                          len(jobs["canary"]), err)  # fmt: skip
                for k, i, _ in jobs["canary"]:
                    out[k]["pilot_errors"][i] = f"{type(err).__name__}: {err}"
                jobs["champion"].extend(jobs["canary"])
        if jobs["champion"]:
            self._answer(served, jobs["champion"], out, "champion")
        n_images = sum(len(v) for v in jobs.values())
        if n_images:
            from vitops.flows.endpoint import metrics

            metrics.BATCH_IMAGES.observe(n_images)
            metrics.BATCH_REQUESTS.observe(sum(1 for o in out if "error" not in o))
        return out if self.max_batch_size > 1 else out[0]

    def _answer(self, model: Served, jobs: list[tuple[int, int, np.ndarray]], out: list[dict], route: str) -> None:
        from vitops.flows.endpoint import metrics

        start = time.perf_counter()
        result = model.run([img for _, _, img in jobs])
        metrics.INFERENCE.labels(model.version).observe(time.perf_counter() - start)
        metrics.IMAGES.labels(self.name, model.version, model.engine).inc(len(jobs))
        for row, (k, i, _) in enumerate(jobs):
            o = out[k]
            o["labels"][i], o["confidence"][i], o["probabilities"][i] = (
                result.labels[row], result.confidence[row], result.probabilities[row])  # fmt: skip
            o["routes"][i], o["versions"][i], o["engines"][i] = route, model.version, model.engine

    # -- loading, checking and switching -------------------------------------------------------------------------

    def _load_checked(self, version: str, path: str) -> Served:
        return load_checked(self.name, version, path, self.warmup_iters, self.max_batch_size)

    def _watch(self) -> None:
        """Stage candidates, switch to the committed version and hold the canary's pilot, until the process ends."""
        target_path = state.target_file(self.state_dir)
        staged: Served | None = None
        seen_seq = None
        refused_pilots: set[str] = set()
        while True:
            time.sleep(0.1)
            try:
                target = state.read(target_path)
                candidate = target.get("candidate") or {}
                if candidate.get("phase") == "stage" and candidate.get("seq") != seen_seq:
                    seen_seq, staged = candidate["seq"], None
                    report = {"seq": seen_seq, "version": candidate["version"], "ok": True}
                    try:
                        staged = self._load_checked(candidate["version"], candidate["path"])
                    except CheckFailed as err:
                        report |= {"ok": False, "check": err.check, "reason": err.reason}
                        log.error("%s version %s failed its %s check: %s", self.name, candidate["version"],
                                  err.check, err.reason)  # fmt: skip
                    self._report(staged=report)
                elif candidate.get("phase") == "abort":
                    staged = None
                serving = target["serving"]
                if serving["version"] != self._served.version:
                    if staged is None or staged.version != serving["version"]:  # e.g. a worker restarted mid-move
                        staged = self._load_checked(serving["version"], serving["path"])
                    old, self._served, staged = self._served, staged, None
                    self._switch(self._served, old)
                self._follow_pilot(target.get("pilot") or {}, refused_pilots)
            except Exception:  # never let the watcher die: the served version keeps answering
                log.exception("worker %d: following the state folder failed; retrying", self.worker_id)
                time.sleep(1.0)

    def _follow_pilot(self, pilot: dict[str, Any], refused: set[str]) -> None:
        """Hold the pilot while its stage is canary; drop it when the stage ends or a guardrail stopped it."""
        want = pilot.get("version") if pilot.get("stage") == "canary" else None
        held = self._pilot.version if self._pilot is not None else None
        if want == held or want in refused:
            return
        if want is None:
            self._pilot = None
            log.info("worker %d: no canary now; %s version %s no longer answers", self.worker_id, self.name, held)
            self._report(pilot_version=None, pilot_engine=None)
            return
        try:
            loaded = self._load_checked(want, pilot["path"])
            if loaded.classes != self._served.classes:
                raise CheckFailed("classes", f"classes {loaded.classes} differ from the served {self._served.classes}")
        except CheckFailed as err:
            refused.add(want)
            log.error("%s pilot version %s failed its %s check; the champion answers every image: %s", self.name,
                      want, err.check, err.reason)  # fmt: skip
            self._report(pilot_failed={"version": want, "check": err.check, "reason": err.reason})
            return
        self._pilot = loaded
        log.info("worker %d: canary of %s version %s (%s) beside version %s", self.worker_id, self.name, want,
                 loaded.engine, self._served.version)  # fmt: skip
        self._report(pilot_version=want, pilot_engine=loaded.engine, pilot_failed=None)

    def _switch(self, new: Served, old: Served | None) -> None:
        from vitops.flows.endpoint import metrics

        if old is not None:
            metrics.SERVING.labels(self.name, old.version, old.engine).set(0)
            log.info("worker %d switched %s from version %s to %s (%s)", self.worker_id, self.name, old.version,
                     new.version, new.engine)  # fmt: skip
        metrics.SERVING.labels(self.name, new.version, new.engine).set(1)
        metrics.VERSION.labels(self.name).set(int(new.version))
        self._report(version=new.version, engine=new.engine, classes=new.classes, img_size=new.img_size, failed=None)

    def _report(self, **changes: Any) -> None:
        self._status |= changes
        state.write(state.worker_file(self.state_dir, self.worker_id), self._status)


def _empty(served: Served, n: int, pilot: Served | None) -> dict[str, Any]:
    """One request's answer before its images are answered: the served version's, image by image."""
    return {
        "version": served.version,
        "engine": served.engine,
        "classes": served.classes,
        "labels": [""] * n,
        "confidence": np.zeros(n, np.float32),
        "probabilities": np.zeros((n, len(served.classes)), np.float32),
        "routes": ["champion"] * n,
        "versions": [served.version] * n,
        "engines": [served.engine] * n,
        "pilot_version": pilot.version if pilot else None,
        "pilot_engine": pilot.engine if pilot else None,
        "pilot_errors": {},
    }
