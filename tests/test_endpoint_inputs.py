"""The endpoint's pure pieces: image bytes checked against their limits, the Open Inference Protocol's request and
response shapes, answers from logits (the pyfunc model's arithmetic), the MLflow webhook signature and the
endpoint's params."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from vitops.deploy import oip
from vitops.deploy.image_input import InputError, Limits, decode_image, image_content_type, images_from_tensor
from vitops.flows.config import ParamsError, parse_params

LIMITS = Limits(max_pixels=100 * 100, max_body_bytes=1 << 20, max_images=4)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def refused(fn, *args, status: int) -> str:
    with pytest.raises(InputError) as err:
        fn(*args)
    assert err.value.status == status, str(err.value)
    return str(err.value)


def test_png_and_jpeg_decode_to_the_pixels_the_pyfunc_model_sees(tmp_path) -> None:
    img = rgb()
    for fmt in ("PNG", "JPEG"):
        data = encode(img, fmt)
        (tmp_path / "x").write_bytes(data)
        with Image.open(tmp_path / "x") as ref:  # what pyfunc_model._open does with a path
            expected = np.asarray(ref.convert("RGB"))
        assert np.array_equal(decode_image(data, LIMITS.max_pixels), expected)
    grey = decode_image(encode(img.convert("L")), LIMITS.max_pixels)
    assert grey.shape == (30, 40, 3) and grey.dtype == np.uint8
    assert decode_image(encode(img.convert("RGBA")), LIMITS.max_pixels).shape == (30, 40, 3)


def test_every_bad_image_is_refused_with_its_status_and_reason() -> None:
    png = encode(rgb())
    assert "not an image" in refused(decode_image, b"hello, not an image", 1000, status=400)
    assert "empty" in refused(decode_image, b"", 1000, status=400)
    assert "truncated" in refused(decode_image, png[: len(png) // 2], LIMITS.max_pixels, status=400)
    jpeg = encode(rgb(64, 64), "JPEG")
    assert "truncated" in refused(decode_image, jpeg[: len(jpeg) // 2], LIMITS.max_pixels, status=400)
    sixteen = encode(Image.fromarray(np.full((8, 8), 40000, np.uint16)))
    assert "mode 'I;16'" in refused(decode_image, sixteen, LIMITS.max_pixels, status=400)
    cmyk = encode(rgb().convert("CMYK"), "JPEG")
    assert "mode 'CMYK'" in refused(decode_image, cmyk, LIMITS.max_pixels, status=400)
    assert "over endpoint.max_pixels" in refused(decode_image, encode(rgb(101, 100)), LIMITS.max_pixels, status=413)
    assert "GIF" in refused(decode_image, encode(rgb(), "GIF"), LIMITS.max_pixels, status=415)


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding() -> None:
    # 6000 x 6000 pixels of zeros compress to 35 kB; decoding them takes 108 MB as RGB
    bomb = encode(Image.new("L", (6000, 6000)))
    assert len(bomb) < 100_000
    assert "6000x6000" in refused(decode_image, bomb, 16_000_000, status=413)


def test_content_types() -> None:
    assert image_content_type("image/png") == "PNG"
    assert image_content_type("image/jpeg; charset=binary") == "JPEG"
    for bad in ("text/plain", "application/octet-stream", None, "image/gif"):
        refused(image_content_type, bad, status=415)


def test_uint8_tensors_and_their_limits() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3))
    images = images_from_tensor(arr.ravel().tolist(), [2, 5, 6, 3], LIMITS)
    assert len(images) == 2 and np.array_equal(images[1], arr[1].astype(np.uint8))
    assert np.array_equal(images_from_tensor(arr.tolist(), [2, 5, 6, 3], LIMITS)[0], arr[0])  # nested works too
    refused(images_from_tensor, [1, 2, 3], [1, 1, 1, 3, 1], LIMITS, status=400)
    refused(images_from_tensor, [1, 2], [1, 1, 1, 3], LIMITS, status=400)
    refused(images_from_tensor, [0, 256, 3], [1, 1, 1, 3], LIMITS, status=400)
    refused(images_from_tensor, ["a", "b", "c"], [1, 1, 1, 3], LIMITS, status=400)
    refused(images_from_tensor, [0] * 3 * 101 * 100, [1, 101, 100, 3], LIMITS, status=413)
    assert "max_batch_images" in refused(images_from_tensor, [0] * 15, [5, 1, 1, 3], LIMITS, status=413)


def infer_body(images: list[bytes], **extra) -> dict:
    data = [base64.b64encode(b).decode() for b in images]
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}], **extra}


def test_an_infer_request_round_trip() -> None:
    pngs = [encode(rgb(seed=i)) for i in range(3)]
    req = oip.parse_infer_request(infer_body(pngs, id="r1", outputs=[{"name": "label"}]), LIMITS)
    assert req.id == "r1" and req.outputs == ["label"] and len(req.images) == 3
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5]])
    out = oip.answers(logits, ["bolt", "nut", "washer"])
    assert out.labels == ["bolt", "nut", "washer"]
    response = oip.infer_response("m", "7", req, out)
    label = {"name": "label", "datatype": "BYTES", "shape": [3], "data": out.labels}
    assert response == {"model_name": "m", "model_version": "7", "id": "r1", "outputs": [label]}
    full = oip.infer_response("m", "7", oip.parse_infer_request(infer_body(pngs), LIMITS), out)
    probs = next(o for o in full["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [3, 3] and len(probs["data"]) == 9


def test_answers_are_the_pyfunc_models_softmax() -> None:
    logits = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32) * 10
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    expected = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)  # pyfunc_model.ImageClassifier.predict
    out = oip.answers(logits, list("abcd"))
    assert np.array_equal(out.probabilities, expected)
    assert np.array_equal(out.confidence, expected.max(axis=1))
    with pytest.raises(ValueError):
        oip.answers(logits, list("abc"))


@pytest.mark.parametrize(
    "body, status, words",
    [
        ([1, 2], 400, "JSON object"),
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, 400, "unknown input"),
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "datatype"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@@"]}]}, 400, "base64"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}, 400, "holds 1"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, 400, "no `data`"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, 400, "not an image"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [5], "data": ["aGk="] * 5}]}, 413, "max_batch"),
        ({**infer_body([b"x"]), "outputs": [{"name": "logits"}]}, 400, "unknown outputs"),
    ],
)
def test_bad_infer_requests_say_what_is_wrong(body, status, words) -> None:
    assert words in refused(oip.parse_infer_request, body, LIMITS, status=status)


def test_the_webhook_signature_is_mlflows() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    from vitops.flows.endpoint.routes import webhook_signature

    body = '{"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "champion"}}'
    ours = webhook_signature("s3cret", "d-1", "1700000000", body.encode())
    assert ours == _generate_hmac_signature("s3cret", "d-1", "1700000000", body)
    assert ours != webhook_signature("other", "d-1", "1700000000", body.encode())


def test_endpoint_params_are_checked() -> None:
    assert parse_params({"endpoint": {"token_env": "VITOPS_TOKEN"}}).endpoint.token_env == "VITOPS_TOKEN"
    for bad, words in [
        ({"token_env": "my secret"}, "token_env"),
        ({"batch_timeout": 2}, "batch_timeout"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"accelerator": "tpu"}, "accelerator"),
        ({"poll": 3}, "allowed keys here"),
    ]:
        with pytest.raises(ParamsError, match=words):
            parse_params({"endpoint": bad})
