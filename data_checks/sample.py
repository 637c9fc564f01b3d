"""Small real datasets for the quickstart and the tests: scikit-learn's bundled handwritten digits as image folders.

`load_digits` ships inside the scikit-learn wheel (1797 8x8 images of the digits 0-9, no download).

- `write_sample`: each image upscaled to `img_size` pixels and written as a grayscale PNG under
  `OUT/<digit>/digit_<index>.png`; the training data of the quickstart.
- `write_line_batch`: "new images from the line", the pilot batch of the quickstart. Its bases are the digits
  whose sample PNG lands outside the train split, so a model trained on the sample never saw their originals,
  shifted the way a new camera or pen would shift them (thicker strokes, lower contrast, a pixel or two off
  centre, faint noise). Part of them are labelled (`OUT/<digit>/line_<index>.png`), the rest are not
  (`OUT/unlabelled/line_<index>.png`).

Both are byte-for-byte deterministic. A marker file (hidden, so scanning and import skip it) records what was
written, so a later call may rewrite an earlier folder of the same kind but never touches a folder holding
anything else.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MARKER = ".vitops-sample.json"
SOURCE = "sklearn.datasets.load_digits"
# The shift of the line batch: ink and background pulled towards grey, noise of this standard deviation.
LINE_LEVELS = (30, 200)
LINE_NOISE = 3.0
_LINE_SEED = 20240612
_DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


class SampleError(ValueError):
    """The sample cannot be written where asked."""


def render_digit(pixels: Any, img_size: int) -> bytes:
    """The PNG bytes of one sample image: an 8x8 digit (values 0-16) upscaled to `img_size`, grayscale."""

    image = _digit_image(pixels, img_size)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _digit_image(pixels: Any, img_size: int) -> Any:
    import numpy as np
    from PIL import Image

    gray = (np.asarray(pixels) * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((img_size, img_size), Image.Resampling.BILINEAR)


def write_sample(out: Path, size: int | None = None, img_size: int = 32) -> list[Path]:
    """Write the digits sample as an ImageFolder.

    Args:
        out: the folder to write; it must be empty, missing, or an earlier sample.
        size: number of images, taken round-robin over the classes so every class gets its share;
            None writes all 1797.
        img_size: side of the square PNGs in pixels.

    Returns:
        The written files.

    Raises:
        SampleError: if `out` holds files that are not an earlier sample, or `size` is out of range.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    previous = _check_target(out, "sample")
    digits = load_digits()
    total = len(digits.target)
    if size is not None and not 1 <= size <= total:
        raise SampleError(f"--size {size} is out of range: the digits dataset has 1 to {total} images")
    order = _round_robin(digits.target)[: size or total]
    files = {
        f"{int(digits.target[index])}/digit_{index:04d}.png": render_digit(digits.images[index], img_size)
        for index in sorted(order)
    }
    return _publish(out, files, previous, {"kind": "sample", "img_size": img_size})


def write_line_batch(
    out: Path,
    img_size: int = 32,
    labelled_share: float = 0.5,
    fractions: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write "new images from the line": held-out digits with a slight, deterministic camera-and-pen shift.

    Args:
        out: the folder to write; it must be empty, missing, or an earlier line batch.
        img_size: side of the square PNGs in pixels; use the sample's, so the bases are its held-out images.
        labelled_share: the share of images put in class folders (the same share of every class); the rest
            go to `unlabelled/`.
        fractions: the train/val/test fractions the sample is split with (default 0.8/0.1/0.1); only digits
            whose sample image falls outside train are used.

    Returns:
        The written files.

    Raises:
        SampleError: if `out` holds files that are not an earlier line batch, or `labelled_share` is not
            between 0 and 1.
    """
    import hashlib

    from sklearn.datasets import load_digits

    from vitops.data_checks.batch import UNLABELLED
    from vitops.data_checks.manifest import split_by_hash

    if not 0.0 <= labelled_share <= 1.0:
        raise SampleError(f"--labelled-share {labelled_share} is out of range: give a share between 0 and 1")
    out = Path(out)
    previous = _check_target(out, "line_batch")
    fractions = dict(fractions or _DEFAULT_FRACTIONS)
    digits = load_digits()
    held_out = [
        index
        for index in range(len(digits.target))
        if split_by_hash(hashlib.sha256(render_digit(digits.images[index], img_size)).hexdigest(), fractions) != "train"
    ]
    rank: dict[int, int] = {}
    files: dict[str, bytes] = {}
    for index in held_out:
        label = int(digits.target[index])
        r = rank[label] = rank.get(label, -1) + 1
        # Bresenham over each class's images in index order: the labelled ones are spread evenly, and every
        # class gets the same share.
        labelled = int((r + 1) * labelled_share) > int(r * labelled_share)
        folder = str(label) if labelled else UNLABELLED
        files[f"{folder}/line_{index:04d}.png"] = _line_image(digits.images[index], img_size, index)
    meta = {"kind": "line_batch", "img_size": img_size, "labelled_share": labelled_share, "fractions": fractions}
    return _publish(out, files, previous, meta)


def _line_image(pixels: Any, img_size: int, index: int) -> bytes:
    import numpy as np
    from PIL import ImageFilter

    rng = np.random.default_rng([_LINE_SEED, index])
    # A broader pen: dilate the bright ink by one pixel per 32 pixels of side, so the shift is the same at
    # every image size.
    pen = ImageFilter.MaxFilter(2 * max(1, round(img_size / 32)) + 1)
    thick = np.asarray(_digit_image(pixels, img_size).filter(pen), dtype=np.float64)
    low, high = LINE_LEVELS
    gray = low + thick * ((high - low) / 255.0)  # a duller camera: black and white both towards grey
    dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
    shifted = np.full_like(gray, float(low))  # the uncovered edge shows background, not wrapped ink
    shifted[max(dy, 0) : img_size + min(dy, 0), max(dx, 0) : img_size + min(dx, 0)] = gray[
        max(-dy, 0) : img_size + min(-dy, 0), max(-dx, 0) : img_size + min(-dx, 0)
    ]
    noisy = shifted + rng.normal(0.0, LINE_NOISE, size=shifted.shape)
    return _png(np.clip(noisy.round(), 0, 255).astype(np.uint8))


def _png(gray: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _publish(out: Path, files: dict[str, bytes], previous: list[str], meta: dict[str, Any]) -> list[Path]:
    # Write the files, remove those of the earlier folder that are not written again, then the marker.
    written = []
    for rel, data in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    names = sorted(files)
    for stale in sorted(set(previous) - set(names)):
        (out / stale).unlink(missing_ok=True)
    marker = {"source": SOURCE, **meta, "files": names}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return written


def _check_target(out: Path, kind: str) -> list[str]:
    if out.exists() and not out.is_dir():
        raise SampleError(f"{out} is a file: give a folder for the {_KINDS[kind]}")
    if not out.exists() or not any(out.iterdir()):
        return []
    marker = out / MARKER
    if not marker.is_file():
        raise SampleError(
            f"{out} is not empty and is not an earlier vitops {_KINDS[kind]}: choose an empty or new folder "
            "(vitops never overwrites your files)"
        )
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    found = recorded.get("kind", "sample")  # markers written before the line batch existed have no kind
    if found != kind:
        raise SampleError(
            f"{out} holds a vitops {_KINDS.get(found, found)}, not a {_KINDS[kind]}: choose an empty or new "
            "folder (vitops never overwrites one with the other)"
        )
    return list(recorded.get("files", []))


_KINDS = {"sample": "sample", "line_batch": "line batch"}


def _round_robin(target) -> list[int]:
    # Rank each image within its class, then take rank 0 of every class, rank 1 of every class, ...
    seen: dict[int, int] = {}
    ranked = []
    for index, label in enumerate(target.tolist()):
        ranked.append((seen.get(label, 0), label, index))
        seen[label] = seen.get(label, 0) + 1
    return [index for _, _, index in sorted(ranked)]
