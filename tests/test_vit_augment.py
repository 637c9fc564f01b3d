"""Batched augmentation on the device keeps timm's recipe: crop parameters as timm draws them, identity and
flips exact, torchvision's colour jitter, timm's erasing; seeded, and fed by a DeviceLoader that covers each
sampled image once per epoch, whether it holds the images on the device or gathers them on the host."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.vit import write_digits
from torchvision.transforms.v2 import functional as TF

from vitops.vit.augment import BatchAugment, Normalise, _color_jitter, sample_crops, sample_erasing
from vitops.vit.bundle import ModelMeta
from vitops.vit.data import AugmentParams, DataError, ShardSampler, create_dataset
from vitops.vit.loader import DeviceLoader

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("digits")
    return root, write_digits(root, size=40)


def _meta() -> ModelMeta:
    return ModelMeta("vit_tiny_patch16_224", [str(d) for d in range(10)], 32, crop_pct=1.0)


def test_crop_parameters_follow_timms_distribution() -> None:
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    sizes = torch.tensor([[30, 40], [40, 16], [40, 40], [5, 40]] * 500)
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = sample_crops(sizes, scale, ratio, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all() and (h >= 1).all() and (w >= 1).all()
    random.seed(0)
    for k, (img_h, img_w) in enumerate(sizes[:4].tolist()):
        img = Image.new("RGB", (img_w, img_h))
        theirs = torch.tensor([RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(2000)])
        ours = torch.stack([top, left, h, w], dim=1)[k::4]
        area_theirs = (theirs[:, 2] * theirs[:, 3]).double().mean() / (img_h * img_w)
        area_ours = (ours[:, 2] * ours[:, 3]).double().mean() / (img_h * img_w)
        assert area_ours == pytest.approx(float(area_theirs), abs=0.03), (img_h, img_w)
        aspect_theirs = (theirs[:, 3] / theirs[:, 2]).double().log().mean()
        aspect_ours = (ours[:, 3] / ours[:, 2]).double().log().mean()
        assert float(aspect_ours) == pytest.approx(float(aspect_theirs), abs=0.05), (img_h, img_w)


def test_full_crop_is_the_identity_and_flip_mirrors_exactly() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    sizes = torch.full((6, 2), 32)
    expected = Normalise(*HALF)(images)
    keep = BatchAugment(32, "bicubic", *HALF, scale_min=1.0)  # a square image: the fallback is the whole image
    assert torch.allclose(keep(images, sizes, torch.Generator().manual_seed(1)), expected, atol=1e-6)
    flip = BatchAugment(32, "bicubic", *HALF, scale_min=1.0, hflip=1.0)
    assert torch.allclose(flip(images, sizes, torch.Generator().manual_seed(1)), expected.flip(-1), atol=1e-6)


def test_crop_resizes_the_region_it_names() -> None:
    # A horizontal ramp: a crop of columns [left, left + w) resized to 32 spans those columns' values.
    ramp = torch.arange(64, dtype=torch.float32).mul(4).to(torch.uint8).expand(2, 3, 64, 64).contiguous()
    aug = BatchAugment(32, "bilinear", (0, 0, 0), (1 / 255, 1 / 255, 1 / 255), scale_min=0.25)
    gen = torch.Generator().manual_seed(3)
    out = aug(ramp, torch.full((2, 2), 64), gen)
    top, left, h, w = sample_crops(torch.full((2, 2), 64), (0.25, 1.0), aug.ratio, torch.Generator().manual_seed(3))
    for b in range(2):
        lo, hi = 4 * float(left[b]), 4 * float(left[b] + w[b] - 1)
        row = out[b, 0, 16]
        assert lo - 4 <= float(row.min()) and float(row.max()) <= hi + 4
        assert float(row[-1] - row[0]) == pytest.approx(hi - lo, rel=0.1)


def test_colour_jitter_is_torchvisions_per_image_in_its_order() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    factors = torch.tensor([[1.3, 0.7, 1.2], [0.6, 1.4, 0.9], [1.0, 1.1, 0.5]])
    order = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    ours = _color_jitter(x.clone(), factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for b in range(3):
        img = x[b]
        for op in order[b].tolist():
            img = ops[op](img, float(factors[b, op]))
        assert torch.allclose(ours[b], img, atol=1e-5)


def test_erasing_rectangles_follow_timm() -> None:
    top, left, h, w = sample_erasing(4000, 32, 0.25, torch.Generator().manual_seed(0))
    erased = (h > 0) & (w > 0)
    assert erased.float().mean().item() == pytest.approx(0.25, abs=0.03)
    area = (h * w)[erased] / 32**2
    assert area.min() >= 0.015 and area.max() <= 0.36
    assert ((top + h <= 32) & (left + w <= 32)).all()
    aug = BatchAugment(32, "bicubic", *HALF, scale_min=1.0, re_prob=1.0)
    images = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    out = aug(images, torch.full((8, 2), 32), torch.Generator().manual_seed(0))
    zero = (out == 0).all(dim=1)
    assert zero.any() and ((out == 1) | (out == 0)).all()


def test_same_seed_same_batch_any_device_path(digits: tuple[Path, pd.DataFrame], monkeypatch) -> None:
    root, rows = digits
    augment = AugmentParams(hflip=0.5, color_jitter=0.3, re_prob=0.25)
    train = create_dataset(root, rows, _meta(), "train", augment)
    sampler = ShardSampler(len(train), shuffle=True, seed=0)

    def epoch(loader: DeviceLoader, n: int) -> list:
        loader.set_epoch(n)
        return list(loader)

    held = DeviceLoader(train, sampler, 8, torch.device("cpu"), seed=0)
    first = epoch(held, 0)
    assert sum(len(t) for _, t in first) == len(train)
    assert sorted(t for _, ts in first for t in ts.tolist()) == sorted(train.targets)
    assert first[0][0].shape == (8, 3, 32, 32) and first[0][0].dtype == torch.float32
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(held, 0), strict=True))
    assert not torch.equal(first[0][0], epoch(held, 1)[0][0])
    host = DeviceLoader(train, sampler, 8, torch.device("cpu"), seed=0)  # gathered on the host: the same batches
    monkeypatch.setattr(host, "holds_images", lambda: False)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(host, 0), strict=True))


_WORKER_GATHER = """
import sys
from pathlib import Path
import pandas as pd
import torch
from vitops.vit.bundle import ModelMeta
from vitops.vit.data import AugmentParams, ShardSampler, create_dataset
from vitops.vit.loader import DeviceLoader
meta = ModelMeta("vit_tiny_patch16_224", [str(d) for d in range(10)], 32, crop_pct=1.0)
train = create_dataset(Path(sys.argv[1]), pd.read_csv(sys.argv[2]), meta, "train", AugmentParams(hflip=0.5))
batches = []
for workers, held in ((0, True), (1, False)):
    loader = DeviceLoader(train, ShardSampler(len(train), shuffle=True), 8, torch.device("cpu"), workers=workers)
    loader.holds_images = lambda held=held: held
    loader.set_epoch(2)
    batches.append(list(loader))
assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches, strict=True))
"""


def test_a_loader_worker_gathers_the_same_batches(digits: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    # In a child process: torch installs a SIGCHLD handler in a process that starts loader workers and never
    # removes it; in the test process, with the suite's other libraries loaded, a later child's exit then
    # crashed pytest with SIGSEGV.
    import subprocess
    import sys

    root, rows = digits
    rows.to_csv(tmp_path / "rows.csv", index=False)
    subprocess.run(
        [sys.executable, "-c", _WORKER_GATHER, str(root), str(tmp_path / "rows.csv")], check=True, timeout=120
    )


def test_rand_augment_stays_in_the_loader(digits: tuple[Path, pd.DataFrame]) -> None:
    root, rows = digits
    train = create_dataset(root, rows, _meta(), "train", AugmentParams(auto_augment="rand-m9-mstd0.5"))
    assert train.batch_transform is None
    with pytest.raises(DataError, match="augment_on: loader"):
        create_dataset(root, rows, _meta(), "train", AugmentParams(auto_augment="rand-m9", augment_on="device"))
    assert create_dataset(root, rows, _meta(), "train", AugmentParams(augment_on="loader")).batch_transform is None
    assert math.isclose(len(train), (rows.split == "train").sum())
