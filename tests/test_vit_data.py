"""Image rows to tensors: timm transforms from the model's metadata, class lists, samplers, bad files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.vit import write_digits

from vitops.vit.bundle import ModelMeta
from vitops.vit.data import (
    AugmentParams,
    DataError,
    ShardSampler,
    class_names,
    class_weights,
    create_dataset,
    load_split_tensors,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("digits")
    return root, write_digits(root, size=50)


def _meta(img_size: int = 32) -> ModelMeta:
    return ModelMeta("vit_tiny_patch16_224", [str(d) for d in range(10)], img_size, crop_pct=1.0)


def test_load_split_tensors_gives_normalised_nchw_and_labels(digits: tuple[Path, pd.DataFrame]) -> None:
    root, rows = digits
    images, labels = load_split_tensors(root, rows, _meta(), "val")
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and sorted(labels.tolist()) == list(range(10))
    # Digits are light strokes on black: after (x - 0.5) / 0.5 the background is -1.
    assert images.min().item() == pytest.approx(-1.0, abs=1e-3)
    assert images.max().item() <= 1.0 + 1e-5
    few, _ = load_split_tensors(root, rows, _meta(48), "test", limit=3)
    assert few.shape == (3, 3, 48, 48)


def test_eval_transform_is_deterministic_and_train_transform_augments(digits: tuple[Path, pd.DataFrame]) -> None:
    root, rows = digits
    val = create_dataset(root, rows, _meta(), "val")
    assert torch.equal(val[0][0], val[0][0])
    train = create_dataset(root, rows, _meta(), "train")
    torch.manual_seed(0)
    assert not all(torch.equal(train[0][0], train[0][0]) for _ in range(3))


def test_labels_outside_the_class_list_are_refused(digits: tuple[Path, pd.DataFrame]) -> None:
    _, rows = digits
    with pytest.raises(DataError, match="not in the configured class list"):
        class_names(rows, ["0", "1"])
    assert class_names(rows) == [str(d) for d in range(10)]


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    rows = pd.DataFrame({"path": ["a/broken.png"], "label": ["a"], "split": ["test"]})
    meta = ModelMeta("resnet18", ["a", "b"], 32)
    with pytest.raises(DataError, match=r"broken\.png.*vitops validate"):
        load_split_tensors(tmp_path, rows, meta, "test")


def test_empty_split_is_a_clear_error(digits: tuple[Path, pd.DataFrame]) -> None:
    root, rows = digits
    with pytest.raises(DataError, match="'val' split"):
        load_split_tensors(root, rows[rows.split != "val"], _meta(), "val")


def test_class_weights_favour_rare_classes() -> None:
    weights = class_weights([0, 0, 0, 0, 1, 2, 2], 4)
    assert weights[1] > weights[2] > weights[0] > 0
    assert weights[3] == 0  # a class absent from training gets no weight


def test_shard_sampler_covers_every_item_once_across_ranks() -> None:
    shards = [list(ShardSampler(11, rank, 3, shuffle=True, seed=5)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [len(s) for s in shards]
    sampler = ShardSampler(11, shuffle=True, seed=5)
    sampler.set_epoch(1)
    assert list(sampler) != list(ShardSampler(11, shuffle=True, seed=5))  # a new order every epoch


def test_weighted_sampler_balances_classes() -> None:
    from vitops.vit.data import sample_weights

    targets = [0] * 90 + [1] * 10
    drawn = list(ShardSampler(100, weights=sample_weights(targets, 2), seed=0))
    minority = sum(targets[i] for i in drawn)
    assert 30 < minority < 70


def test_seeded_augmentation_depends_on_epoch_and_item_only(digits: tuple[Path, pd.DataFrame]) -> None:
    root, rows = digits
    train = create_dataset(root, rows, _meta(), "train")
    train.seed = 0
    n = len(train)
    first = train[3][0]
    torch.manual_seed(123)  # the global RNG state does not matter ...
    assert torch.equal(train[3][0], first)
    assert not torch.equal(train[n + 3][0], first)  # ... the epoch does
    state = torch.get_rng_state()
    train[2 * n + 3]
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's RNG is left alone


def test_rand_augment_is_seeded_per_item_too(digits: tuple[Path, pd.DataFrame]) -> None:
    """timm's RandAugment draws from NumPy's global generator: that must not break resume either."""
    import numpy as np

    root, rows = digits
    train = create_dataset(root, rows, _meta(), "train", AugmentParams(auto_augment="rand-m9-mstd0.5"))
    train.seed = 0
    first = train[5][0]
    np.random.seed(99)
    state = np.random.get_state()[1].copy()
    assert torch.equal(train[5][0], first)
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's NumPy state is left alone


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "v0", "augmix-m5-w4-d2"])
def test_strongest_posterize_draw_keeps_the_image_instead_of_crashing(policy: str) -> None:
    """timm asks for 0 posterize bits (`inc1` at magnitude 10, `v0` at 0), which Pillow 11 rejects mid-run."""
    from PIL import Image
    from timm.data import auto_augment

    from vitops.vit.data import create_transforms

    transform = create_transforms(_meta(), is_training=True, augment=AugmentParams(auto_augment=policy))
    policy_t = next(t for t in transform.transforms if hasattr(t, "ops") or hasattr(t, "policy"))
    ops = list(getattr(policy_t, "ops", [])) + [op for sub in getattr(policy_t, "policy", []) for op in sub]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize, f"{policy} has no posterize op"
    img = Image.new("RGB", (32, 32), (200, 120, 40))
    zero_bit_draws = 0
    for op in posterize:
        for magnitude in (0.0, auto_augment._LEVEL_DENOM):
            op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
            out = op(img)
            assert out.size == img.size
            if op.level_fn(op.magnitude, op.hparams)[0] < 1:  # used to raise: keeps the top bit instead
                zero_bit_draws += 1
                assert out.getpixel((0, 0)) == auto_augment.ImageOps.posterize(img, 1).getpixel((0, 0))
    assert zero_bit_draws
