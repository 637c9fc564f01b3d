"""The inference side of the endpoint: a LitServe `LitAPI` whose worker processes hold the served version and
switch to the next one without dropping a request.

LitServe runs `setup` and `predict` in worker processes that it spawns, and HTTP in other processes, so the swap
happens here, where the model lives. Each worker

- loads the `serving` version of `target.json` in `setup` and checks it (below) before it reports ready;
- runs a watcher thread that stages a `candidate` (loads it beside the served version, predicts the input
  example through both the pyfunc model and this endpoint's own path and requires the same answers, then warms
  it up at batch 1 and at a full batch), reports the result, and switches when the follower names the
  candidate `serving`: one assignment, between two batches;
- answers a batch with the version it read when the batch began, so a request finishes on the version that
  accepted it, and every answer names that version and its engine.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request

from vitops.flows.endpoint import state
from vitops.flows.endpoint.follower import configure_logging

log = logging.getLogger("vitops.endpoint")
ENGINE_BATCH = 64  # the pyfunc model's own chunk; also the largest batch a TensorRT profile is built for here


@dataclass
class Served:
    """A loaded, checked version."""

    version: str
    path: str
    model: Any  # the pyfunc ImageClassifier
    engine: str  # e.g. onnxruntime-fp32
    classes: list[str]
    img_size: int

    def run(self, images: list[np.ndarray]) -> Any:
        """Answers about decoded `H, W, 3` uint8 images, the way the pyfunc model computes them."""
        from PIL import Image

        from vitops.deploy.oip import answers

        batch = np.stack([self.model.preprocess(Image.fromarray(img).convert("RGB")) for img in images])
        logits = np.concatenate(
            [self.model.logits(batch[i : i + ENGINE_BATCH]) for i in range(0, len(batch), ENGINE_BATCH)]
        )
        return answers(logits, self.classes)


class CheckFailed(Exception):
    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check, self.reason = check, reason


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
        """Load and check the served version, then start watching for the next one."""
        # Ctrl-C in a terminal reaches the whole process group: LitServe's main process stops the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        configure_logging(self.verbose)
        if str(device).startswith("cuda:"):  # engines see only this worker's GPU (LitServe counts the visible ones)
            index = int(str(device).split(":", 1)[1])
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
        self.worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self._status: dict[str, Any] = {"pid": os.getpid(), "staged": None}
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
        """Answer a batch of requests (one request when batching is off) on the version served when it began."""
        from vitops.flows.endpoint import metrics

        served = self._served  # one read: the whole batch runs on this version, whatever the watcher does
        payloads = x if self.max_batch_size > 1 else [x]
        out: list[dict[str, Any]] = []
        todo = []
        for payload in payloads:
            want = payload.get("version")
            if want is not None and want != served.version:
                out.append({"status": 404, "error": f"version {want} of {self.name} is not served here "
                            f"(serving {served.version})"})  # fmt: skip
            else:
                out.append({})
                todo.append((len(out) - 1, payload["images"]))
        if todo:
            images = [img for _, imgs in todo for img in imgs]
            start = time.perf_counter()
            result = served.run(images)
            metrics.INFERENCE.labels(served.version).observe(time.perf_counter() - start)
            metrics.BATCH_IMAGES.observe(len(images))
            metrics.BATCH_REQUESTS.observe(len(todo))
            metrics.IMAGES.labels(self.name, served.version, served.engine).inc(len(images))
            first = 0
            for index, imgs in todo:
                rows = slice(first, first + len(imgs))
                first += len(imgs)
                out[index] = {
                    "version": served.version,
                    "engine": served.engine,
                    "classes": served.classes,
                    "labels": result.labels[rows],
                    "confidence": result.confidence[rows],
                    "probabilities": result.probabilities[rows],
                }
        return out if self.max_batch_size > 1 else out[0]

    # -- loading, checking and switching -------------------------------------------------------------------------

    def _load_checked(self, version: str, path: str) -> Served:
        """Load a version from its verified folder, predict its input example both ways, and warm it up."""
        from vitops.flows import registry

        try:
            pyfunc, example = registry.load_local_pyfunc(Path(path))
            model = pyfunc.unwrap_python_model()
            engine = f"{model.engine.get('target')}-{model.engine.get('precision')}"
            served = Served(version, path, model, engine, list(model.meta["classes"]), int(model.meta["img_size"]))
        except Exception as err:  # a version this machine cannot load is refused, never served
            raise CheckFailed("load", str(err)) from None
        try:
            images = list(np.asarray(example, dtype=np.uint8).reshape(-1, *np.asarray(example).shape[-3:]))
            ours = served.run(images)
            theirs = pyfunc.predict(np.stack(images))
            probs = theirs[[f"prob_{c}" for c in served.classes]].to_numpy(np.float32)
            if not np.isfinite(ours.probabilities).all():
                raise ValueError("the input example's probabilities are not finite")
            if list(theirs["label"]) != ours.labels or not np.allclose(probs, ours.probabilities, atol=1e-5):
                raise ValueError("this endpoint's answer on the input example differs from pyfunc.predict's")
        except Exception as err:
            raise CheckFailed("input_example", str(err)) from None
        try:
            start = time.perf_counter()
            for _ in range(self.warmup_iters):
                served.run(images[:1])
                served.run((images * ENGINE_BATCH)[: max(1, min(ENGINE_BATCH, self.max_batch_size))])
            log.info("%s version %s: loaded with %s, input example answered as pyfunc.predict does, warmed up in "
                     "%.2f s", self.name, version, engine, time.perf_counter() - start)  # fmt: skip
        except Exception as err:
            raise CheckFailed("warmup", str(err)) from None
        return served

    def _watch(self) -> None:
        """Stage candidates and switch to the committed version, until the process ends."""
        target_path = state.target_file(self.state_dir)
        staged: Served | None = None
        seen_seq = None
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
            except Exception:  # never let the watcher die: the served version keeps answering
                log.exception("worker %d: following the state folder failed; retrying", self.worker_id)
                time.sleep(1.0)

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
