"""Safe inspection of one image file: content hash, format, size after EXIF rotation and cheap drift statistics.

Every problem becomes a reason string that names what is wrong and what to do about it; nothing here raises
for bad data. Files are opened with `O_NOFOLLOW` and only when they are regular files inside the dataset
root, so a symlink or a path that leaves the root is reported and its target is never opened. A file over the
size limit is refused from its `stat` before any byte is read, and a file whose header Pillow cannot read (or
whose pixel count is a decompression bomb) is refused from its first bytes; only then is it read whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from typing import Any

# EXIF orientations 5-8 rotate by 90 degrees: the stored width and height swap when the image is shown.
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
# Drift statistics are computed on a sample of STATS_SIZE x STATS_SIZE pixels.
STATS_SIZE = 64
STAT_COLUMNS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")
MAX_FILE_BYTES = 64 * 1024 * 1024  # the default size limit (params.yaml validate.max_file_mb)
_CHUNK = 1024 * 1024


def empty_row(path: str) -> dict[str, Any]:
    """A manifest row for `path` with every measured field blank."""
    row: dict[str, Any] = {"path": path, "sha256": "", "bytes": None, "format": "", "mode": ""}
    row.update({"width": None, "height": None, "error": ""})
    row.update(dict.fromkeys(STAT_COLUMNS))
    return row


def inspect_image(data: bytes) -> dict[str, Any]:
    """Decode image bytes fully and describe them.

    Args:
        data: the file's bytes.

    Returns:
        format, mode, width and height (as displayed, after EXIF orientation), the per-channel mean and
        standard deviation of a small RGB copy, and `error`: empty when the image is usable, else the reason.
    """
    from PIL import Image, UnidentifiedImageError

    info: dict[str, Any] = {"format": "", "mode": "", "width": None, "height": None, "error": ""}
    if not data:
        info["error"] = "empty file (0 bytes): remove it or copy the image again"
        return info
    stage = "open"
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                info["format"], info["mode"] = img.format or "", img.mode
                width, height = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION) if img.format in ("JPEG", "TIFF", "WEBP") else None
                if orientation in _SWAPPED_ORIENTATIONS:
                    width, height = height, width
                info["width"], info["height"] = width, height
                stage = "decode"
                img.load()
                stage = "convert"
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                stage = "stats"
                info.update(_channel_stats(rgb))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            info["error"] = (
                f"decompression bomb: {err} Pillow refuses images over MAX_IMAGE_PIXELS="
                f"{Image.MAX_IMAGE_PIXELS}; downscale the image before adding it"
            )
        except UnidentifiedImageError:
            info["error"] = (
                f"not an image Pillow can read ({len(data)} bytes, starts with {data[:8]!r}): remove it or "
                "convert it to PNG or JPEG"
            )
        except Exception as err:  # noqa: BLE001 - decoders raise many types; each becomes a reason
            info["error"] = _reason(stage, info, err)
    return info


def _reason(stage: str, info: dict[str, Any], err: Exception) -> str:
    detail = f"{type(err).__name__}: {err}"
    if stage == "open":
        return f"cannot open as an image ({detail}): remove it or re-save it as PNG or JPEG"
    if stage == "decode":
        return f"truncated or corrupt image data ({detail}): copy the file again from its source"
    if stage == "convert":
        return f"mode {info['mode']} cannot be converted to RGB ({detail}): re-save it as RGB, RGBA or grayscale"
    return f"cannot compute image statistics ({detail})"


def _channel_stats(rgb: Any) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    # A nearest-neighbour sample of STATS_SIZE x STATS_SIZE pixels: enough for channel means and spreads,
    # and it costs almost nothing next to the decode.
    small = rgb.resize((STATS_SIZE, STATS_SIZE), Image.Resampling.NEAREST)
    pixels = np.asarray(small).reshape(-1, 3).astype(np.float32)
    mean = pixels.mean(axis=0)
    std = np.sqrt(np.maximum((pixels * pixels).mean(axis=0) - mean * mean, 0.0))
    values = [*mean.tolist(), *std.tolist()]
    return {name: round(float(v), 3) for name, v in zip(STAT_COLUMNS, values, strict=True)}


def scan_file(root: str, rel: str, max_bytes: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """Read and inspect one file of a dataset without following links.

    Args:
        root: the dataset root, already resolved (no symlinks in it).
        rel: the file's path relative to `root`, with `/` separators.
        max_bytes: files larger than this are refused before they are read (0: no limit).

    Returns:
        A manifest row (without label and split): path, sha256, bytes, the fields of `inspect_image`, error.
    """
    row = empty_row(rel)
    full = os.path.join(root, *rel.split("/"))
    try:
        st = os.lstat(full)
    except OSError as err:
        row["error"] = f"cannot stat the file ({err.strerror}): check it still exists and is readable"
        return row
    if stat.S_ISLNK(st.st_mode):
        row["error"] = (
            "symbolic link: not followed (vitops never reads outside the dataset folder); replace the link "
            "with a copy of the image"
        )
        return row
    if not stat.S_ISREG(st.st_mode):
        row["error"] = "not a regular file (a device, pipe or socket): remove it from the dataset folder"
        return row
    real = os.path.realpath(full)
    if os.path.commonpath([real, root]) != root:
        row["error"] = f"path leaves the dataset root (resolves to {real}): not read; move the image inside {root}"
        return row
    if max_bytes and st.st_size > max_bytes:
        row["bytes"] = st.st_size
        row["error"] = (
            f"file of {st.st_size / 2**20:.1f} MiB is over the size limit of {max_bytes / 2**20:.1f} MiB "
            "(validate.max_file_mb): not read; downscale or recompress the image, or raise the limit"
        )
        return row
    try:
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            header = inspect_header(fh)
            if header:  # refused from its first bytes: hashed in chunks, never held whole
                row["error"] = header
                row["sha256"], row["bytes"] = _stream_sha256(fh)
                return row
            fh.seek(0)
            data = fh.read(max_bytes + 1) if max_bytes else fh.read()
    except OSError as err:
        row["error"] = f"cannot read the file ({err.strerror}): check its permissions"
        return row
    if max_bytes and len(data) > max_bytes:  # it grew since the stat
        row["error"] = f"file grew past the size limit of {max_bytes / 2**20:.1f} MiB while read: not inspected"
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    row["bytes"] = len(data)
    row.update(inspect_image(data))
    return row


def inspect_header(fh: Any) -> str:
    """Why an open image file is refused from its header alone (Pillow reads only the first bytes), or "".

    An empty file, a file Pillow cannot identify and a pixel count over Pillow's `MAX_IMAGE_PIXELS` are refused
    here; everything else is left to the full decode of `inspect_image`.
    """
    from PIL import Image, UnidentifiedImageError

    start = fh.read(16)
    if not start:
        return "empty file (0 bytes): remove it or copy the image again"
    fh.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fh) as img:
                width, height = img.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            return (
                f"decompression bomb: {err} Pillow refuses images over MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; "
                "downscale the image before adding it"
            )
        except UnidentifiedImageError:
            return f"not an image Pillow can read (starts with {start[:8]!r}): remove it or convert it to PNG or JPEG"
        except Exception:  # noqa: BLE001 - a header Pillow identifies but cannot parse: the full decode says why
            return ""
    return ""


def _stream_sha256(fh: Any) -> tuple[str, int]:
    fh.seek(0)
    digest, size = hashlib.sha256(), 0
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def scan_files(root: str, rels: list[str], max_bytes: int = MAX_FILE_BYTES) -> list[dict[str, Any]]:
    """`scan_file` over a chunk of paths; the unit of work of one scanner process."""
    return [scan_file(root, rel, max_bytes) for rel in rels]
