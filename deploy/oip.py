"""The Open Inference Protocol (KServe v2) of an image classifier, as plain functions: reading an infer request,
writing its response and the model's metadata, and turning logits into answers.

The protocol is what Triton, KServe, MLServer and OpenVINO Model Server speak, so their clients work against a
vitops endpoint. The model has one input, `image`, in one of two forms:

- `BYTES`, shape `[N]` (or `[N, 1]`): N encoded PNG or JPEG files, each a base64 string in the JSON body;
- `UINT8`, shape `[N, H, W, 3]`: raw RGB pixels, row-major, flat or nested.

and three outputs: `label` (`BYTES [N]`), `confidence` (`FP32 [N]`) and `probabilities` (`FP32 [N, C]`, in the
order of `classes`). A request may name the outputs it wants. Errors are the protocol's `{"error": "..."}`. Each
image is known by its sha256: of the file's bytes for a BYTES element, of its raw `H, W, 3` uint8 bytes for a
UINT8 element; the response's `parameters` carry per-image lists (`sha256`, `request_id`, `route`, `version`).
Triton's binary-tensor extension is not spoken: its clients send JSON with `binary_data=False`.

`answers` is the pyfunc model's own arithmetic (softmax in float64, then float32), so the same logits give the
same numbers as `pyfunc.predict`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitops.deploy.image_input import InputError, Limits, check_image_count, decode_image, images_from_tensor

INPUT = "image"
OUTPUTS = ("label", "confidence", "probabilities")


@dataclass
class InferRequest:
    """A checked infer request: its id, the decoded images and the outputs asked for, and each image's sha256 and
    encoded file (None for a UINT8 element)."""

    id: str | None
    images: list[np.ndarray]
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    sha256: list[str] = field(default_factory=list)
    files: list[bytes | None] = field(default_factory=list)


@dataclass
class Answers:
    """What the model says about a batch: one label and confidence per image, the probabilities N x C."""

    labels: list[str]
    confidence: np.ndarray
    probabilities: np.ndarray


def answers(logits: np.ndarray, classes: list[str]) -> Answers:
    """Softmax of `N, C` logits as the pyfunc model computes it (float64, then float32), with the top class."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(classes):
        raise ValueError(f"logits of shape {logits.shape} do not match {len(classes)} classes")
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    best = probs.argmax(axis=1)
    return Answers([classes[i] for i in best], probs[np.arange(len(best)), best], probs)


def parse_infer_request(body: Any, limits: Limits) -> InferRequest:
    """Check an infer request's JSON and decode its images; an `InputError` (4xx) says what is wrong."""
    if not isinstance(body, dict):
        raise InputError("an infer request is a JSON object with an `inputs` list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(f"an infer request carries exactly one input, {INPUT!r}, in its `inputs` list")
    rid, outputs = _request_id(body), _requested_outputs(body)  # the cheap checks before any decoding
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name != INPUT:
        raise InputError(f"unknown input {name!r}: this model takes one input, {INPUT!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InputError(f"input {INPUT!r}: `shape` must be a list of integers, not {shape!r}")
    if "data" not in tensor:
        raise InputError(f"input {INPUT!r} has no `data` (Triton's binary-data extension is not supported)")
    if datatype == "BYTES":
        files = _files_from_bytes(tensor["data"], shape, tensor.get("parameters") or {}, limits)
        images = [decode_image(raw, limits.max_pixels, f"input {INPUT!r}[{i}]") for i, raw in enumerate(files)]
        hashes = [hashlib.sha256(raw).hexdigest() for raw in files]
    elif datatype == "UINT8":
        images = images_from_tensor(tensor["data"], shape, limits, what=f"input {INPUT!r}")
        files = [None] * len(images)
        hashes = [hashlib.sha256(np.ascontiguousarray(img, np.uint8).tobytes()).hexdigest() for img in images]
    else:
        raise InputError(
            f"input {INPUT!r} has datatype {datatype!r}: send BYTES (base64 PNG or JPEG files) or UINT8 [N,H,W,3]"
        )
    return InferRequest(rid, images, outputs, hashes, list(files))


def infer_response(
    model: str, version: str, request: InferRequest, out: Answers, parameters: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The protocol's infer response for `request`, from the answers about its images; `parameters` (e.g. per-image
    lists of sha256, request ids and routes) go into the response's `parameters`."""
    n, classes = len(out.labels), out.probabilities.shape[1]
    tensors = {
        "label": {"datatype": "BYTES", "shape": [n], "data": list(out.labels)},
        "confidence": {"datatype": "FP32", "shape": [n], "data": out.confidence.tolist()},
        "probabilities": {"datatype": "FP32", "shape": [n, classes], "data": out.probabilities.ravel().tolist()},
    }
    response: dict[str, Any] = {
        "model_name": model,
        "model_version": version,
        "outputs": [{"name": name, **tensors[name]} for name in request.outputs],
    }
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    return response


def model_metadata(model: str, version: str, engine: str, classes: list[str], img_size: int) -> dict[str, Any]:
    """The protocol's model metadata (`GET /v2/models/NAME`) with the input and outputs this endpoint speaks."""
    return {
        "name": model,
        "versions": [version],
        "platform": engine,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
        ],
        "classes": list(classes),
        "input_shape": [-1, -1, -1, 3],
        "model_input_shape": [-1, 3, img_size, img_size],
    }


def _files_from_bytes(data: Any, shape: list[int], parameters: dict, limits: Limits) -> list[bytes]:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InputError(f"input {INPUT!r}: a BYTES input has shape [N] or [N, 1], not {shape}")
    items = _flatten(data)
    check_image_count(len(items), limits)
    if len(items) != math.prod(shape):
        raise InputError(f"input {INPUT!r}: shape {shape} says {math.prod(shape)} images, `data` holds {len(items)}")
    if parameters.get("content_type") not in (None, "base64"):
        raise InputError(f"input {INPUT!r}: BYTES data is base64 (content_type 'base64'), not {parameters!r}")
    files = []
    for i, item in enumerate(items):
        what = f"input {INPUT!r}[{i}]"
        if not isinstance(item, str):
            raise InputError(f"{what}: BYTES data are base64 strings of PNG or JPEG files")
        if len(item) * 3 // 4 > limits.max_body_bytes:
            raise InputError(f"{what} is over endpoint.max_body_mb", 413)
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{what} is not valid base64") from None
        files.append(raw)
    return files


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise InputError(f"input {INPUT!r}: `data` must be a list")
    flat: list[Any] = []
    for item in data:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def _request_id(body: dict) -> str | None:
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InputError(f"`id` must be a string, not {rid!r}")
    return rid


def _requested_outputs(body: dict) -> list[str]:
    wanted = body.get("outputs")
    if wanted is None:
        return list(OUTPUTS)
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise InputError("`outputs` must be a list of objects with a `name`")
    names = [o.get("name") for o in wanted]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InputError(f"unknown outputs {unknown}: this model answers {', '.join(OUTPUTS)}")
    return names or list(OUTPUTS)
