"""Images arriving over the network, checked before any model sees them: encoded PNG or JPEG bytes decoded into
RGB arrays, and raw `N, H, W, 3` uint8 tensors, each held to the limits a line-side endpoint sets.

Every refusal is an `InputError` with the HTTP status it deserves and a message that says what was wrong and
what is allowed, so a client can fix its request and the server never falls over on one:

- 400: not an image, a truncated or corrupt file, an unsupported mode (16-bit, CMYK, float ...), a bad tensor;
- 413: an image over `max_pixels` (checked from the header, before decoding: decompression bombs), a body over
  its limit, more images than a request may carry;
- 415: a content type or image format other than PNG and JPEG.

Decoding matches the pyfunc model's own (`Image.open(...).convert("RGB")`, no EXIF rotation), so an image sent
here gets the same pixels as the same file given to `pyfunc.predict`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}
CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
# 8-bit modes that convert to RGB without losing meaning. 16-bit and 32-bit integer, float, CMYK and the
# colour spaces are refused: PIL's convert("RGB") clips or guesses them, and the model would see other pixels.
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")


class InputError(ValueError):
    """A request the endpoint refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_pixels: int = 16_000_000
    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 64


def check_body_size(size: int, limits: Limits, setting: str = "endpoint.max_body_mb") -> None:
    """Refuse a body (declared or read so far) over the limit, with 413."""
    if size > limits.max_body_bytes:
        raise InputError(
            f"request body of {size / 2**20:.1f} MiB is over {setting} ({limits.max_body_bytes / 2**20:g} MiB)",
            413,
        )


def check_image_count(n: int, limits: Limits) -> None:
    """Refuse an empty request or one with more images than `limits.max_images`."""
    if n < 1:
        raise InputError("the request holds no image")
    if n > limits.max_images:
        raise InputError(
            f"a batch of {n} images is over endpoint.max_batch_images ({limits.max_images}); split it", 413
        )


def image_content_type(header: str | None) -> str:
    """The image format a `Content-Type` header names (`PNG` or `JPEG`), else 415."""
    media = (header or "").split(";", 1)[0].strip().lower()
    if media not in CONTENT_TYPES:
        shown = repr(media) if media else "no Content-Type"
        raise InputError(
            f"{shown} is not accepted here: send the image as Content-Type image/png or image/jpeg, or as "
            "multipart/form-data with one file part",
            415,
        )
    return CONTENT_TYPES[media]


def decode_image(data: bytes, max_pixels: int, what: str = "the body") -> np.ndarray:
    """Decode a PNG or JPEG into an `H, W, 3` uint8 RGB array, or refuse it.

    Args:
        data: the encoded file.
        max_pixels: largest width x height accepted, checked from the header before any pixel is decoded.
        what: how messages name this image ("the body", "input image[2]").
    """
    if not data:
        raise InputError(f"{what} is empty: send a PNG or JPEG image")
    with warnings.catch_warnings():
        # PIL warns (and past twice its own limit, raises) on huge images; both are refusals here
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InputError(f"{what} is not an image ({len(data)} bytes that PIL cannot identify)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputError(
                f"{what} is too large to decode safely, far over endpoint.max_pixels ({err})", 413
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise InputError(f"{what} is not a readable image: {err}") from None
        with img:
            if img.format not in FORMATS:
                raise InputError(f"{what} is a {img.format} image; send PNG or JPEG", 415)
            width, height = img.size
            if width * height > max_pixels:
                raise InputError(
                    f"{what} is {width}x{height} = {width * height:,} pixels, over endpoint.max_pixels "
                    f"({max_pixels:,}); send a smaller image",
                    413,
                )
            if img.mode not in MODES:
                raise InputError(
                    f"{what} has image mode {img.mode!r}, which is not supported; send 8-bit grayscale, RGB or "
                    f"RGBA (modes {', '.join(MODES)})"
                )
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated data, bad CRC, broken stream
                raise InputError(f"{what} is a truncated or corrupt {img.format} file: {err}") from None
            return np.asarray(img.convert("RGB"), dtype=np.uint8)


def images_from_tensor(values: object, shape: list[int], limits: Limits, what: str = "input") -> list[np.ndarray]:
    """A `UINT8` tensor `[N, H, W, 3]` (flat or nested row-major values) as N `H, W, 3` arrays, or refuse it."""
    if len(shape) != 4 or shape[3] != 3 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise InputError(f"{what}: a UINT8 input has shape [N, H, W, 3] with every dimension >= 1, not {shape}")
    n, height, width, _ = shape
    check_image_count(n, limits)
    if height * width > limits.max_pixels:
        raise InputError(
            f"{what}: images of {width}x{height} = {width * height:,} pixels are over endpoint.max_pixels "
            f"({limits.max_pixels:,})",
            413,
        )
    try:
        arr = np.asarray(values, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{what}: UINT8 data must be integers 0..255 (a flat or nested list)") from None
    if arr.size != n * height * width * 3:
        raise InputError(f"{what}: shape {shape} needs {n * height * width * 3} values, got {arr.size}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputError(f"{what}: UINT8 data must lie in 0..255, got {arr.min()}..{arr.max()}")
    return list(arr.astype(np.uint8).reshape(n, height, width, 3))
