"""Decode once: the eval geometry is timm's bit for bit, the training geometry keeps the image, and the cache is
keyed, reused, built once under concurrency, published atomically (a killed build leaves nothing that is read)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitops.vit import decode
from vitops.vit.bundle import ModelMeta
from vitops.vit.data import DataError, create_transforms, image_dataset
from vitops.vit.decode import DecodeSpec, cache_key, decode_images, prune_cache

SIZES = [(40, 30), (20, 50), (64, 64), (33, 33), (90, 12)]  # (width, height)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        mode = "L" if i % 2 else "RGB"
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / f"{i}.png")
        paths.append(f"{i}.png")
    return root, paths


def _meta(img_size: int = 32, crop_pct: float = 0.875) -> ModelMeta:
    return ModelMeta("vit_tiny_patch16_224", ["a", "b"], img_size, crop_pct=crop_pct)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_eval_items_equal_timms_eval_transform_bit_for_bit(images: tuple[Path, list[str]], crop_pct: float) -> None:
    root, paths = images
    meta = _meta(crop_pct=crop_pct)
    dataset = image_dataset(root, paths, [0] * len(paths), meta, training=False)
    reference = create_transforms(meta, is_training=False)
    for i, path in enumerate(paths):
        with Image.open(root / path) as img:
            expected = reference(img.convert("RGB"))
        assert torch.equal(dataset[i][0], expected), path
    # the batched form, on this CPU, is the same too
    batch = dataset.batch_transform(dataset.decoded.images, dataset.decoded.sizes)
    assert torch.equal(batch, torch.stack([dataset[i][0] for i in range(len(paths))]))


def test_training_geometry_keeps_the_whole_image_and_never_enlarges(images: tuple[Path, list[str]]) -> None:
    root, paths = images
    decoded = decode_images(root, paths, DecodeSpec.for_training(32, "bicubic"))  # fits inside 40 x 40
    assert decoded.images.shape == (len(paths), 3, 40, 40) and decoded.images.dtype == torch.uint8
    fitted = [tuple(int(v) for v in hw) for hw in decoded.sizes]
    assert fitted == [(30, 40), (40, 16), (40, 40), (33, 33), (5, 40)]  # (height, width), aspect kept
    with Image.open(root / paths[3]) as img:  # 33 x 33 fits: kept as it is
        assert np.array_equal(decoded.image(3), np.asarray(img.convert("RGB")))
    # the filling repeats the last column and row
    canvas = decoded.images[3]
    assert torch.equal(canvas[:, :33, 33:], canvas[:, :33, 32:33].expand(-1, -1, 7))
    assert torch.equal(canvas[:, 33:, :], canvas[:, 32:33, :].expand(-1, 7, -1))
    small = decode_images(root, paths[3:4], DecodeSpec.for_training(32, "bicubic"))
    assert small.images.shape[-1] == 33  # no wider than the largest image needs


def test_large_sets_go_through_the_cache_and_are_reused(
    images: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, paths = images
    spec = DecodeSpec.for_training(32, "bicubic")
    first = decode_images(root, paths, spec, cache_dir=tmp_path, memory_bytes=0)
    entry = tmp_path / cache_key(root, paths, spec)
    assert first.path == entry and (entry / "info.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [entry.name]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode, "_decode", no_decoding)
    again = decode_images(root, paths, spec, cache_dir=tmp_path, memory_bytes=0)
    assert torch.equal(again.images, first.images) and torch.equal(again.sizes, first.sizes)
    # another geometry or another content is another entry
    assert cache_key(root, paths, DecodeSpec.for_training(48, "bicubic")) != entry.name
    assert cache_key(root, paths, spec, content_ids=["x"] * len(paths)) != cache_key(root, paths, spec, ["y"] * 5)
    # a cache-backed set pickles as its path (a spawned loader worker maps it again)
    assert len(pickle.dumps(again)) < 1000
    assert torch.equal(pickle.loads(pickle.dumps(again)).images, first.images)


def test_cache_and_memory_give_the_same_images(images: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, paths = images
    spec = DecodeSpec.for_training(32, "bilinear")
    cached = decode_images(root, paths, spec, cache_dir=tmp_path, memory_bytes=0, threads=3)
    memory = decode_images(root, paths, spec, threads=1)
    assert cached.path is not None and memory.path is None
    assert torch.equal(cached.images, memory.images) and torch.equal(cached.sizes, memory.sizes)


def test_concurrent_builders_decode_once(images: tuple[Path, list[str]], tmp_path: Path, monkeypatch) -> None:
    root, paths = images
    spec = DecodeSpec.for_training(32, "bicubic")
    calls = []
    real = decode._decode

    def slow_decode(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode", slow_decode)
    results: list = [None] * 3

    def build(i: int) -> None:
        results[i] = decode_images(root, paths, spec, cache_dir=tmp_path, memory_bytes=0)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is not None and torch.equal(r.images, results[0].images) for r in results)


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from vitops.vit import decode
real = decode._place
def slow_place(*args):
    real(*args)
    time.sleep(10)
decode._place = slow_place
decode.decode_images(Path(sys.argv[1]), sys.argv[3:], decode.DecodeSpec.for_training(32, "bicubic"),
                     cache_dir=Path(sys.argv[2]), memory_bytes=0, threads=1)
"""


def test_a_build_killed_mid_write_leaves_nothing_that_is_used(images: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, paths = images
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(root), str(cache), *paths])
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*/images.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    spec = DecodeSpec.for_training(32, "bicubic")
    key = cache_key(root, paths, spec)
    assert not (cache / key).exists()  # nothing published
    assert [p for p in cache.glob(f".{key}.*") if p.is_dir()]  # only the dead builder's temporary folder
    rebuilt = decode_images(root, paths, spec, cache_dir=cache, memory_bytes=0)
    assert rebuilt.path == cache / key
    assert not [p for p in cache.glob(f".{key}.*") if p.is_dir()]  # removed by the next build
    assert torch.equal(rebuilt.images, decode_images(root, paths, spec).images)


def test_old_entries_are_pruned(images: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, paths = images
    old = decode_images(root, paths, DecodeSpec.for_training(32, "bicubic"), cache_dir=tmp_path, memory_bytes=0)
    assert old.path is not None
    long_ago = time.time() - 30 * 86400
    os.utime(old.path / "info.json", (long_ago, long_ago))
    assert prune_cache(tmp_path) == [old.path] and not old.path.exists()
    assert torch.equal(old.images, old.images.clone())  # a process that mapped it can still read it


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png.*vitops validate"):
        image_dataset(tmp_path, ["broken.png"], [0], _meta(), training=True)
