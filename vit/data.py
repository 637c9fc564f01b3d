"""Images listed in a table of rows (path, label, split) under a dataset root: datasets, timm transforms, samplers.

The table is what the data gate hands over (`data_checks.manifest.load_usable`): one row per usable image,
`path` relative to the root in posix form. Nothing here reads the manifest file itself, so any caller (a test,
another data source) can pass a DataFrame, and `image_dataset` takes plain lists. Each split is decoded once
(`vit.decode`); the training augmentation then runs in batches on the device (`vit.augment`, `vit.loader`) or,
for RandAugment/AutoAugment, per image in the loader. Transforms come from timm (`resolve_data_config`,
`create_transform`); the normalisation and resize settings travel with the model in `ModelMeta`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vitops.vit.bundle import ModelMeta
from vitops.vit.decode import Decoded

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Rows that cannot be used for training or evaluation; the message says which and what to do."""


@dataclass
class AugmentParams:
    """Training-time augmentation: timm's training transform (`timm.data.create_transform`) with these settings.

    Attributes:
        scale_min: smallest crop area fraction of RandomResizedCrop (timm's 0.08 suits ImageNet, not small sets).
        hflip: horizontal flip probability (0 for text, digits and other orientation-bound images).
        color_jitter: colour jitter strength; 0 turns it off.
        auto_augment: timm auto-augment policy such as `rand-m9-mstd0.5`, or None.
        re_prob: random-erasing probability.
        augment_on: `device` (whole batches on the training device, `vit.augment`), `loader` (timm's per-image
            transforms in the data loader) or `auto` (device, unless `auto_augment` needs the loader).
    """

    scale_min: float = 0.8
    hflip: float = 0.0
    color_jitter: float = 0.0
    auto_augment: str | None = None
    re_prob: float = 0.0
    augment_on: str = "auto"

    def on_device(self) -> bool:
        """Whether the training augmentation runs on the device in batches.

        Raises:
            DataError: `augment_on: device` with an `auto_augment` policy, which has no batched form.
        """
        if self.augment_on not in ("auto", "device", "loader"):
            raise DataError(f"augment_on must be auto, device or loader, got {self.augment_on!r}")
        if self.augment_on == "device" and self.auto_augment:
            raise DataError(
                f"auto_augment {self.auto_augment!r} runs per image in the loader: set augment_on: loader (or auto)"
            )
        return self.augment_on == "device" or (self.augment_on == "auto" and not self.auto_augment)


def class_names(rows: pd.DataFrame, classes: Sequence[str] | None = None) -> list[str]:
    """The class list in logit order: `classes` when given, else the sorted labels found in `rows`.

    Raises:
        DataError: if rows carry labels outside `classes`, or fewer than two classes exist.
    """
    found = sorted({str(label) for label in rows["label"]})
    if classes:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"labels {unknown} are not in the configured class list {list(classes)}; fix data.classes")
        names = list(classes)
    else:
        names = found
    if len(names) < 2:
        raise DataError(f"need at least two classes to train a classifier, found {names}")
    return names


def split_rows(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split, in table order.

    Raises:
        DataError: if the table lacks the needed columns or has no rows for `split`.
    """
    missing = {"path", "label", "split"} - set(rows.columns)
    if missing:
        raise DataError(f"image table lacks columns {sorted(missing)}; expected path, label, split")
    part = rows[rows["split"] == split]
    if part.empty:
        raise DataError(f"no usable images in the {split!r} split; check the manifest and the validation report")
    return part.reset_index(drop=True)


class ImageRows(Dataset):
    """A map-style dataset over images decoded once (`vit.decode`), with two ways to read it.

    - Item by item (`dataset[i]`, a DataLoader): the image through `transform`, timm's per-image transform
      (training: the whole augmentation; evaluation: ToTensor + Normalize of the decoded, already resized and
      cropped image, which is today's evaluation input bit for bit).
    - Batch by batch on the device (`vit.loader.DeviceLoader`): uint8 batches of `decoded.images` through
      `batch_transform` (`vit.augment.BatchAugment` or `Normalise`); None when the augmentation must run per image.

    Args:
        root: dataset root the paths are relative to.
        paths: image files relative to `root`.
        targets: class index of every image.
        decoded: the images, decoded once.
        transform: callable from a PIL image to a tensor.
        batch_transform: callable on uint8 batches on the device, or None.
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        targets: Sequence[int],
        decoded: Decoded,
        transform: Any = None,
        batch_transform: Any = None,
    ) -> None:
        self.root = Path(root)
        self.paths = [str(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.decoded = decoded
        self.transform = transform
        self.batch_transform = batch_transform
        self.seed: int | None = None  # set by the training loader together with an EpochSampler
        # timm's RandAugment/AugMix draw from NumPy's global generator; seeding it per image costs ~70 us,
        # so it is done only when such a transform is in use (set by `image_dataset`).
        self.seed_numpy = False

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> Any:
        """The decoded RGB image of row `i` (for evaluation: already resized and centre-cropped)."""
        from PIL import Image

        return Image.fromarray(self.decoded.image(i), mode="RGB")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # An index from EpochSampler carries the epoch: augment with a seed of (seed, epoch, item), so the
        # result does not depend on which loader worker (or how many) produced it, nor on a resume.
        epoch, i = divmod(index, len(self))
        img = self.load_image(i)
        if self.transform is None:
            return img, self.targets[i]
        if self.seed is None:
            return self.transform(img), self.targets[i]
        seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + i
        # Reseed only the CPU generators the transforms draw from, and restore them afterwards.
        # torch.manual_seed would do the same to the CPU generator, but it also seeds every accelerator
        # backend, which costs ~100 us per call: more than the whole transform of a small image.
        generator = torch.default_generator
        py_state, torch_state = random.getstate(), generator.get_state()
        np_state = np.random.get_state() if self.seed_numpy else None
        try:
            random.seed(seed)
            generator.manual_seed(seed % 2**63)
            if np_state is not None:
                np.random.seed(seed % 2**32)
            image = self.transform(img)
        finally:
            random.setstate(py_state)
            generator.set_state(torch_state)
            if np_state is not None:
                np.random.set_state(np_state)
        return image, self.targets[i]


def resolve_meta(
    model: nn.Module,
    model_name: str,
    classes: Sequence[str],
    img_size: int,
    model_kwargs: dict[str, Any] | None = None,
    crop_pct: float | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelMeta:
    """Model metadata with timm's data config (mean, std, interpolation) for `img_size`.

    Args:
        model: the network; its `pretrained_cfg` supplies the normalisation its weights expect.
        model_name: timm architecture name.
        classes: class names in logit order.
        img_size: square input side.
        model_kwargs: extra `timm.create_model` arguments needed to rebuild it.
        crop_pct: centre-crop fraction at evaluation; None keeps timm's value for the model.
        extra: provenance to store.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    return ModelMeta(
        model=model_name,
        classes=list(classes),
        img_size=img_size,
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
        crop_pct=float(crop_pct if crop_pct is not None else cfg["crop_pct"]),
        model_kwargs=dict(model_kwargs or {}),
        extra=dict(extra or {}),
    )


def create_transforms(meta: ModelMeta, is_training: bool, augment: AugmentParams | None = None) -> Any:
    """timm's train or eval transform for a model described by `meta`."""
    from timm.data import create_transform

    common = dict(
        input_size=(3, meta.img_size, meta.img_size),
        interpolation=meta.interpolation,
        mean=meta.mean,
        std=meta.std,
    )
    if not is_training:
        return create_transform(is_training=False, crop_pct=meta.crop_pct, **common)
    aug = augment or AugmentParams()
    transform = create_transform(
        is_training=True,
        scale=(aug.scale_min, 1.0),
        hflip=aug.hflip,
        vflip=0.0,
        color_jitter=aug.color_jitter or None,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        **common,
    )
    _keep_posterize_bits(transform)
    return transform


def _keep_posterize_bits(transform: Any) -> None:
    """Make timm's Posterize ops keep at least one bit per channel.

    timm maps the highest magnitudes of `rand-...-inc1` (and some AutoAugment sub-policies) to 0 bits, which
    Pillow 11 rejects with `ValueError: bits must be between or equal to 1 and 8`, hours into a run, at the
    first unlucky draw (older Pillow returned a black image). Keeping 1 bit is the strongest posterize that
    still shows the image.
    """
    from timm.data import auto_augment

    def at_least_one_bit(img: Any, bits: int, **kwargs: Any) -> Any:
        return auto_augment.posterize(img, max(1, int(bits)), **kwargs)

    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", []))
        ops += [op for sub_policy in getattr(t, "policy", []) for op in sub_policy]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = at_least_one_bit


def create_dataset(
    root: Path,
    rows: pd.DataFrame,
    meta: ModelMeta,
    split: str,
    augment: AugmentParams | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> ImageRows:
    """The dataset of one split, decoded once: training augmentation for `train`, evaluation input otherwise.

    Args:
        root: dataset root.
        rows: image table (path, label, split; the manifest's sha256, when present, keys the decode cache).
        meta: the model's metadata (classes, input size, interpolation, normalisation, crop).
        split: `train`, `val` or `test`.
        augment: the training augmentation.
        cache_dir: the decode cache for sets too large to keep in memory (`vit.decode`); None: memory only.
        threads: decoding threads.
    """
    part = split_rows(rows, split)
    index = {name: i for i, name in enumerate(meta.classes)}
    unknown = sorted({str(x) for x in part["label"]} - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's classes {list(meta.classes)}")
    content = list(part["sha256"]) if "sha256" in part.columns and part["sha256"].notna().all() else None
    targets = [index[str(label)] for label in part["label"]]
    training = split == "train"
    return image_dataset(root, list(part["path"]), targets, meta, training, augment, content, cache_dir, threads)


def image_dataset(
    root: Path,
    paths: Sequence[str],
    targets: Sequence[int],
    meta: ModelMeta,
    training: bool,
    augment: AugmentParams | None = None,
    content_ids: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> ImageRows:
    """`create_dataset` without a table: images, their class indices and, optionally, their content hashes.

    Raises:
        DataError: an image cannot be decoded, or the augmentation settings conflict.
    """
    from vitops.vit.augment import BatchAugment, Normalise
    from vitops.vit.decode import DecodeError, DecodeSpec, decode_images

    aug = augment or AugmentParams()
    if training:
        spec, geometry = DecodeSpec.for_training(meta.img_size, meta.interpolation), None
        transform = create_transforms(meta, is_training=True, augment=aug)
        batch_transform = None
        if aug.on_device():
            batch_transform = BatchAugment(
                meta.img_size, meta.interpolation, meta.mean, meta.std, aug.scale_min, aug.hflip,
                aug.color_jitter, aug.re_prob,
            )  # fmt: skip
    else:
        spec = DecodeSpec.for_eval(meta.img_size, meta.interpolation, meta.crop_pct)
        geometry, transform = _split_eval_transform(create_transforms(meta, is_training=False))
        batch_transform = Normalise(meta.mean, meta.std)
    try:
        decoded = decode_images(root, paths, spec, content_ids, cache_dir, threads, geometry=geometry)
    except DecodeError as err:
        raise DataError(str(err)) from err
    dataset = ImageRows(root, paths, targets, decoded, transform=transform, batch_transform=batch_transform)
    dataset.seed_numpy = training and bool(aug.auto_augment)
    return dataset


def _split_eval_transform(transform: Any) -> tuple[Any, Any]:
    """timm's eval transform as (the PIL steps before ToTensor: resize and crop, the tensor steps from it on)."""
    from torchvision import transforms

    steps = list(transform.transforms)
    cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    return transforms.Compose(steps[:cut]), transforms.Compose(steps[cut:])


def load_split_tensors(
    root: Path, rows: pd.DataFrame, meta: ModelMeta, split: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as evaluation-transformed tensors, for parity checks and INT8 calibration.

    Args:
        root: dataset root.
        rows: image table (path, label, split).
        meta: the model's metadata (classes, img_size, normalisation).
        split: `train`, `val` or `test`.
        limit: keep only the first `limit` rows of the split.

    Returns:
        Images as one float32 tensor (N, 3, H, W) and int64 labels (N,).
    """
    part = split_rows(rows, split)
    if limit is not None:
        part = part.head(limit)
    dataset = create_dataset(root, part, meta, split)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images).float(), torch.tensor(labels, dtype=torch.int64)


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (absent classes get weight 0)."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.int64), minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights * (num_classes / weights.sum().clamp(min=1e-12))


class ShardSampler(Sampler[int]):
    """Deterministic per-epoch order, sharded across ranks without padding.

    Shuffles (or, with `weights`, draws with replacement in proportion to the weights) from a generator
    seeded by `seed + epoch`, so every rank computes the same order and a resumed run sees the same batches;
    rank r then takes items r, r + world, ... Used for weighted sampling and for evaluation (no shuffle),
    where every sample must be counted exactly once across ranks.
    """

    def __init__(
        self,
        size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        weights: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.weights, self.seed = shuffle, weights, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=gen).tolist()
        if self.shuffle:
            return torch.randperm(self.size, generator=gen).tolist()
        return list(range(self.size))

    def __iter__(self):
        return iter(self._order()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class EpochSampler(Sampler[int]):
    """Wraps a sampler with `set_epoch` and yields `epoch * size + index`, so the dataset knows the epoch
    even in persistent loader workers (see `ImageRows.__getitem__`)."""

    def __init__(self, inner: Any, size: int) -> None:
        self.inner, self.size, self.epoch = inner, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (self.epoch * self.size + i for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def sample_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights that make every class equally likely under weighted sampling."""
    per_class = class_weights(targets, num_classes)
    return per_class[torch.as_tensor(targets, dtype=torch.int64)].double()
