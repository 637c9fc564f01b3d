"""A version as the endpoint holds it: loaded from its verified folder, checked and warmed up, ready to answer.

The inference workers hold the served version (and, in a canary, the pilot beside it); the shadow process holds
the pilot in a shadow. All load a version the same way (`load_checked`): the pyfunc model's own loader on the
folder the follower fetched and checked, the input example predicted through both `pyfunc.predict` and this
endpoint's path (they must agree), and a warm-up at batch 1 and at a full batch. A version that fails any of
these raises `CheckFailed` naming the check, and is never served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    """A version failed one of its checks at load: `check` is load, input_example, warmup or classes."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check, self.reason = check, reason


def load_checked(name: str, version: str, path: str, warmup_iters: int, max_batch_size: int) -> Served:
    """Load a version from its verified folder, predict its input example both ways, and warm it up.

    Raises:
        CheckFailed: the version cannot be loaded here, answers its input example unlike `pyfunc.predict`, or
            fails its warm-up.
    """
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
        for _ in range(warmup_iters):
            served.run(images[:1])
            served.run((images * ENGINE_BATCH)[: max(1, min(ENGINE_BATCH, max_batch_size))])
        log.info("%s version %s: loaded with %s, input example answered as pyfunc.predict does, warmed up in "
                 "%.2f s", name, version, engine, time.perf_counter() - start)  # fmt: skip
    except Exception as err:
        raise CheckFailed("warmup", str(err)) from None
    return served
