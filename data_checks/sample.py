"""A small real dataset for the quickstart and the tests: scikit-learn's bundled handwritten digits as an ImageFolder.

`load_digits` ships inside the scikit-learn wheel (1797 8x8 images of the digits 0-9, no download). Each image
is upscaled to `img_size` pixels and written as a grayscale PNG under `OUT/<digit>/digit_<index>.png`. The
output is byte-for-byte deterministic. A marker file (hidden, so scanning and import skip it) records what was
written, so a later call may rewrite an earlier sample but never touches a folder holding anything else.
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER = ".vitops-sample.json"


class SampleError(ValueError):
    """The sample cannot be written where asked."""


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
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out)
    previous = _check_target(out)
    digits = load_digits()
    total = len(digits.target)
    if size is not None and not 1 <= size <= total:
        raise SampleError(f"--size {size} is out of range: the digits dataset has 1 to {total} images")
    order = _round_robin(digits.target)[: size or total]
    written: list[Path] = []
    for index in sorted(order):
        label = int(digits.target[index])
        pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((img_size, img_size), Image.Resampling.BILINEAR)
        path = out / str(label) / f"digit_{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG", optimize=False)
        written.append(path)
    names = sorted(p.relative_to(out).as_posix() for p in written)
    for stale in sorted(set(previous) - set(names)):
        (out / stale).unlink(missing_ok=True)
    marker = {"source": "sklearn.datasets.load_digits", "img_size": img_size, "files": names}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return written


def _check_target(out: Path) -> list[str]:
    if out.exists() and not out.is_dir():
        raise SampleError(f"{out} is a file: give a folder for the sample")
    if not out.exists() or not any(out.iterdir()):
        return []
    marker = out / MARKER
    if not marker.is_file():
        raise SampleError(
            f"{out} is not empty and is not an earlier vitops sample: choose an empty or new folder "
            "(vitops never overwrites your files)"
        )
    return list(json.loads(marker.read_text(encoding="utf-8")).get("files", []))


def _round_robin(target) -> list[int]:
    # Rank each image within its class, then take rank 0 of every class, rank 1 of every class, ...
    seen: dict[int, int] = {}
    ranked = []
    for index, label in enumerate(target.tolist()):
        ranked.append((seen.get(label, 0), label, index))
        seen[label] = seen.get(label, 0) + 1
    return [index for _, _, index in sorted(ranked)]
