"""Decode each image once into uint8 tensors: in memory for small sets, else a memory-mapped cache entry.

Every split of a training run is decoded once, before the first epoch, into one uint8 array (N, 3, side, side)
in one of two geometries (`DecodeSpec`):

- `eval`: timm's evaluation resize and centre crop, exactly (the geometric steps of the model's eval transform,
  applied with PIL), so that ToTensor + Normalize on the result is bit for bit today's evaluation input.
- `train`: the whole image, aspect kept, shrunk (never enlarged) to fit a square of `side` pixels, placed at
  the top left of the square and the rest filled by repeating its last row and column; each image's height and
  width are kept beside the array, so crops are drawn from the image and not from the filling.

Sets of more than `memory_bytes` go to a cache folder (`train.decode_cache`, by default
~/.cache/vitops/decoded): one entry per (images, geometry), named by a hash of the files' content hashes (the
manifest's sha256, or size and mtime without them) and the geometry, so a new data version or another input
size makes a new entry and a rerun reuses the old one. An entry is built in a temporary folder and renamed into
place: a process killed mid-write leaves only a temporary folder, which is never read and is removed by the
next build. A lock file makes concurrent builders (torchrun ranks, two runs) wait for the first instead of
decoding twice. Entries unused for `KEEP_DAYS` are removed when a new one is written. Clear the cache by
deleting the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout of an entry changes: old entries then miss and age out
TRAIN_HEADROOM = 1.25  # training images are kept up to 1.25x the input size, so that crops are rarely enlarged
MEMORY_BYTES = 64 * 2**20  # decoded sets up to this size stay in memory: decoding them takes seconds
KEEP_DAYS = 14


class DecodeError(ValueError):
    """An image that cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class DecodeSpec:
    """The geometry images are decoded into (see the module docstring).

    Attributes:
        kind: `eval` (resize + centre crop to `side`) or `train` (fit inside `side`, aspect kept).
        side: side of the square every image is stored in.
        interpolation: PIL resampling filter name (timm's: bicubic, bilinear, ...).
        crop_pct: `eval` only: the centre-crop fraction of timm's eval transform.
    """

    kind: str
    side: int
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def for_training(cls, img_size: int, interpolation: str) -> DecodeSpec:
        return cls("train", math.ceil(img_size * TRAIN_HEADROOM), interpolation)

    @classmethod
    def for_eval(cls, img_size: int, interpolation: str, crop_pct: float) -> DecodeSpec:
        return cls("eval", img_size, interpolation, float(crop_pct))


class Decoded:
    """Decoded images: `images` uint8 (N, 3, side, side) and `sizes` int64 (N, 2), each image's height and width.

    An instance backed by a cache entry pickles as the entry's path and maps it again where it is unpickled
    (a spawned DataLoader worker), instead of copying the images.
    """

    def __init__(self, images: torch.Tensor, sizes: torch.Tensor, path: Path | None = None) -> None:
        self.images, self.sizes, self.path = images, sizes, path

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def image(self, i: int) -> np.ndarray:
        """Image `i` as an (H, W, 3) uint8 array, without the filling around it."""
        h, w = (int(v) for v in self.sizes[i])
        return self.images[i, :, :h, :w].permute(1, 2, 0).numpy()

    def __getstate__(self) -> dict[str, Any]:
        if self.path is None:
            return {"images": self.images, "sizes": self.sizes, "path": None}
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["path"] is None:
            self.images, self.sizes, self.path = state["images"], state["sizes"], None
        else:
            loaded = _open_entry(Path(state["path"]))
            self.images, self.sizes, self.path = loaded.images, loaded.sizes, loaded.path


def decode_images(
    root: Path,
    paths: Sequence[str],
    spec: DecodeSpec,
    content_ids: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    memory_bytes: int = MEMORY_BYTES,
    geometry: Callable[[Any], Any] | None = None,
) -> Decoded:
    """Decode `paths` (relative to `root`) once into `spec`'s geometry, in memory or through the cache.

    Args:
        root: folder the paths are relative to.
        paths: image files, in dataset order.
        spec: the geometry.
        content_ids: a content hash per path (the manifest's sha256); None uses each file's size and mtime.
        cache_dir: the cache folder for sets over `memory_bytes`; None keeps every set in memory (a large one
            in an unlinked temporary file).
        threads: decoding threads (PIL releases the GIL while it decodes and resizes); None: up to 8.
        memory_bytes: decoded size up to which a set stays in memory.
        geometry: `eval` only: the PIL transform that resizes and crops (timm's eval transform without its
            tensor steps); it must be what `spec` describes.

    Raises:
        DecodeError: a file cannot be read as an image.
    """
    root = Path(root)
    threads = threads or min(8, os.cpu_count() or 1)
    count = len(paths)
    nbytes = count * 3 * spec.side * spec.side
    if cache_dir is None or nbytes <= memory_bytes:
        return _decode(root, paths, spec, threads, geometry, out=None, large=nbytes > memory_bytes)
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(root, paths, spec, content_ids)
    entry = cache_dir / key
    if (entry / "info.json").is_file():
        return _use_entry(entry)
    with _locked(cache_dir / f".{key}.lock"):
        if (entry / "info.json").is_file():  # another process built it while this one waited
            return _use_entry(entry)
        _remove_stale(cache_dir, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.{os.getpid()}.", dir=cache_dir))
        try:
            start = time.perf_counter()
            _decode(root, paths, spec, threads, geometry, out=tmp)
            info = {"format": FORMAT, "spec": asdict(spec), "count": count, "root": str(root), "first": paths[0]}
            (tmp / "info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
            for name in ("images.npy", "sizes.npy", "info.json"):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, entry)  # atomic: the entry appears complete or not at all
            log.info("decoded %d images into %s in %.1f s", count, entry, time.perf_counter() - start)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    prune_cache(cache_dir)
    return _use_entry(entry)


def cache_key(root: Path, paths: Sequence[str], spec: DecodeSpec, content_ids: Sequence[str] | None = None) -> str:
    """The name of the cache entry of these files in this geometry."""
    if content_ids is None:
        ids = []
        for p in paths:
            st = (Path(root) / p).stat()
            ids.append(f"{st.st_size}:{st.st_mtime_ns}")
    else:
        ids = [str(c) for c in content_ids]
    doc = json.dumps({"format": FORMAT, "spec": asdict(spec), "items": list(zip(map(str, paths), ids, strict=True))})
    return f"{spec.kind}-{spec.side}-{hashlib.sha256(doc.encode()).hexdigest()[:32]}"


def prune_cache(cache_dir: Path, keep_days: float = KEEP_DAYS) -> list[Path]:
    """Remove the entries of `cache_dir` unused for `keep_days` (a use touches info.json); returns them."""
    cutoff = time.time() - keep_days * 86400
    removed = []
    for info in Path(cache_dir).glob("*/info.json"):
        try:
            if info.stat().st_mtime < cutoff:
                shutil.rmtree(info.parent, ignore_errors=True)  # a process still mapping it keeps its pages
                removed.append(info.parent)
        except FileNotFoundError:
            continue
    return removed


def _decode(
    root: Path,
    paths: Sequence[str],
    spec: DecodeSpec,
    threads: int,
    geometry: Callable[[Any], Any] | None,
    out: Path | None,
    large: bool = False,
) -> Decoded:
    """Decode into a new entry folder `out`, or into memory (a large set: an unlinked temporary file)."""
    from PIL import Image

    if spec.kind == "eval" and geometry is None:
        raise ValueError("an eval DecodeSpec needs the geometry transform it describes")
    count = len(paths)
    fits = [(spec.side, spec.side)] * count if spec.kind == "eval" else None
    side = spec.side
    if fits is None:
        with ThreadPoolExecutor(threads) as pool:
            fits = list(pool.map(lambda p: _fit(_image_size(root / p), spec.side), paths))
        side = max(max(hw) for hw in fits) if fits else spec.side  # no wider than the largest image needs
    shape = (count, 3, side, side)
    if out is not None:
        images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
    elif large:
        # An unlinked file: the pages can leave memory, and the space is freed when the array is.
        images = np.memmap(tempfile.TemporaryFile(), dtype=np.uint8, mode="w+", shape=shape)
    else:
        images = np.empty(shape, dtype=np.uint8)
    sizes = np.asarray(fits, dtype=np.int64).reshape(count, 2)
    resample = getattr(Image.Resampling, spec.interpolation.upper(), Image.Resampling.BICUBIC)

    def decode_one(i: int) -> None:
        path = root / paths[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as err:
            raise DecodeError(f"{path}: cannot read image ({err}); rerun `vitops validate` to exclude it") from err
        if spec.kind == "eval":
            rgb = geometry(rgb)
            if rgb.size != (side, side):
                raise ValueError(f"the eval geometry gave {rgb.size}, not {side}x{side}")
        else:
            h, w = (int(v) for v in sizes[i])
            if rgb.size != (w, h):
                rgb = rgb.resize((w, h), resample)
        _place(images[i], np.asarray(rgb))

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(decode_one, range(count)):
            pass
    if out is not None:
        images.flush()
        np.save(out / "sizes.npy", sizes)
        return Decoded(torch.empty(0), torch.empty(0))  # the caller maps the published entry
    return Decoded(torch.from_numpy(images), torch.from_numpy(sizes))


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
    except OSError as err:
        raise DecodeError(f"{path}: cannot read image ({err}); rerun `vitops validate` to exclude it") from err
    return h, w


def _fit(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """The (height, width) of an image shrunk, aspect kept, to fit inside `side` (never enlarged)."""
    h, w = hw
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _place(canvas: np.ndarray, hwc: np.ndarray) -> None:
    """Write an (h, w, 3) image at the top left of a (3, S, S) canvas and repeat its edges into the rest, so that
    interpolation at the image's border sees the border, not black."""
    h, w = hwc.shape[:2]
    canvas[:, :h, :w] = hwc.transpose(2, 0, 1)
    if w < canvas.shape[2]:
        canvas[:, :h, w:] = canvas[:, :h, w - 1 : w]
    if h < canvas.shape[1]:
        canvas[:, h:, :] = canvas[:, h - 1 : h, :]


def _use_entry(entry: Path) -> Decoded:
    os.utime(entry / "info.json")  # last use, for pruning
    return _open_entry(entry)


def _open_entry(entry: Path) -> Decoded:
    # Copy-on-write mapping: writable for torch (no warning), and nothing is ever written back to the file.
    images = np.load(entry / "images.npy", mmap_mode="c")
    sizes = np.load(entry / "sizes.npy")
    return Decoded(torch.from_numpy(images), torch.from_numpy(sizes), path=entry)


class _locked:
    """An exclusive lock on `path` (fcntl.flock) for the duration of a `with` block."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _remove_stale(cache_dir: Path, key: str) -> None:
    """Remove temporary folders of `key` left by builders that died (their process is gone)."""
    for tmp in cache_dir.glob(f".{key}.*"):
        if not tmp.is_dir():
            continue
        pid = tmp.name.removeprefix(f".{key}.").split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
