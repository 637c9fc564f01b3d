"""Builders of small image folders for the data tests: clean images, planted problems and valid-but-unusual files."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (24, 24), mode: str = "RGB") -> Image.Image:
    """A distinct random image (distinct seeds give distinct bytes)."""
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.frombytes(mode, size, pixels.tobytes())


def write_png(path: Path, seed: int, size: tuple[int, int] = (24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(seed, size).save(path, format="PNG")
    return path


def write_clean(root: Path, counts: dict[str, int], seed: int = 0, prefix: str = "img") -> list[Path]:
    """A flat ImageFolder with `counts[label]` distinct PNGs per label."""
    written = []
    for label, count in counts.items():
        for i in range(count):
            seed += 1
            written.append(write_png(root / label / f"{prefix}_{i:03d}.png", seed))
    return written


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or link target) of everything under `root`, links not followed."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                digest[rel] = "link:" + os.readlink(full)
            elif os.path.isfile(full):
                digest[rel] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            else:
                digest[rel] = "special"
    return digest


def _la_tiff() -> bytes:
    # Grayscale TIFF with *associated* (premultiplied) alpha: Pillow opens it as mode "La", which it cannot
    # convert to RGB. Pillow writes LA with unassociated alpha (ExtraSamples=2); patch the tag to 1.
    buf = io.BytesIO()
    Image.new("LA", (24, 24), (100, 200)).save(buf, format="TIFF")
    data = buf.getvalue()
    tag = bytes.fromhex("5201030001000000")
    assert data.count(tag + bytes.fromhex("02000000")) == 1
    return data.replace(tag + bytes.fromhex("02000000"), tag + bytes.fromhex("01000000"))


def _bomb_png() -> bytes:
    # 10000 x 10000 = 1e8 pixels, over Pillow's MAX_IMAGE_PIXELS (89,478,485) but under twice it, so Pillow
    # only warns; the gate must still refuse it. 1-bit zeros compress to a few kB.
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def build_planted(root: Path, outside: Path) -> tuple[dict[str, str], list[str]]:
    """A flat ImageFolder with one planted problem per file, plus valid-but-unusual files.

    Classes expected by the test: cat, dog, bird. `bird` is missing, `dog` has too few usable images
    (4 < 5), and cat (13) vs dog (4) is an imbalance of 3.25.

    Returns:
        planted: relative path -> a phrase its rejection reason must contain.
        unusual: relative paths of valid but unusual files that must not be rejected.
    """
    write_clean(root, {"cat": 8, "dog": 3}, seed=100)
    planted: dict[str, str] = {}

    def put(rel: str, data: bytes, phrase: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        planted[rel] = phrase

    put("cat/empty.png", b"", "empty file")
    full_jpeg = _jpeg(noise_image(7, (64, 64)))
    put("cat/truncated.jpg", full_jpeg[: len(full_jpeg) // 2], "truncated")
    put("cat/notes.png", b"these are my notes, not an image\n", "not an image")
    put("cat/bomb.png", _bomb_png(), "decompression bomb")
    put("cat/premultiplied.tif", _la_tiff(), "cannot be converted to RGB")
    buf = io.BytesIO()
    noise_image(8, (6, 6)).save(buf, format="PNG")
    put("cat/tiny.png", buf.getvalue(), "smaller than the minimum")
    buf = io.BytesIO()
    noise_image(9).save(buf, format="PNG")
    put("zebra/stray.png", buf.getvalue(), "not in data.classes")
    same = io.BytesIO()
    noise_image(10).save(same, format="PNG")
    put("cat/same.png", same.getvalue(), "also labelled 'dog'")
    put("dog/same.png", same.getvalue(), "also labelled 'cat'")
    put("readme.png", _png_bytes(15), "not inside a label folder")

    # Links: to an image outside the dataset and to a folder outside it. Neither may be opened.
    outside.mkdir(parents=True, exist_ok=True)
    write_png(outside / "secret.png", 11)
    write_png(outside / "dir" / "x.png", 12)
    os.symlink(outside / "secret.png", root / "dog" / "link.png")
    os.symlink(outside / "dir", root / "dog" / "linkdir")
    planted["dog/link.png"] = "symbolic link"
    planted["dog/linkdir"] = "symbolic link"
    os.mkfifo(root / "cat" / "pipe.png")
    planted["cat/pipe.png"] = "not a regular file"

    # OS clutter and hidden files: skipped quietly (never in the manifest).
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / "Thumbs.db").write_bytes(b"thumbs")
    (root / "cat" / "._apple.png").write_bytes(b"\x00\x05\x16\x07")
    write_png(root / "__MACOSX" / "cat" / "x.png", 13)
    write_png(root / ".cache" / "cat" / "y.png", 14)

    unusual = {
        "cat/cmyk.jpg": _jpeg(noise_image(20, (32, 32), mode="CMYK")),
        "cat/sixteen.png": _png_i16(),
        "cat/palette.png": _png_palette(),
        "cat/rotated.jpg": _rotated_jpeg(),
        "cat/with space é.png": _png_bytes(21),
        "dog/ñandú 猫.png": _png_bytes(22),
    }
    for rel, data in unusual.items():
        (root / rel).write_bytes(data)
    return planted, sorted(unusual)


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def _png_i16() -> bytes:
    pixels = np.random.default_rng(30).integers(0, 65536, size=(24, 24), dtype=np.uint16)
    buf = io.BytesIO()
    Image.frombytes("I;16", (24, 24), pixels.astype("<u2").tobytes()).save(buf, format="PNG")
    return buf.getvalue()


def _png_palette() -> bytes:
    buf = io.BytesIO()
    noise_image(31).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buf, format="PNG")
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    # Stored 40 wide x 20 high with EXIF orientation 6 (rotate 90): displayed 20 x 40.
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(noise_image(32, (40, 20)), exif=exif.tobytes())


def build_leaky(root: Path) -> str:
    """A pre-split folder where one val image is a copy of a train image; returns the val copy's path."""
    for split, counts in {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}}.items():
        write_clean(root / split, counts, seed=200 if split == "train" else 300, prefix=split)
    data = (root / "train" / "a" / "train_000.png").read_bytes()
    (root / "val" / "a" / "copy.png").write_bytes(data)
    return "val/a/copy.png"
