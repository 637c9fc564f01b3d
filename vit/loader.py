"""Batches on the training device from images decoded once: gathered, moved and augmented there.

    DeviceLoader(dataset, sampler, batch_size, device, ...)   iterates like a DataLoader over (images, targets)
                                                              on `device`: float32, augmented or normalised by
                                                              the dataset's `batch_transform`

On the CPU, and on a GPU when a split's uint8 images fit in `RESIDENT_FRACTION` of its free memory, the images
are held on the device: a batch is one `index_select` there, and nothing crosses the bus per step. Otherwise
batches are gathered on the host (from memory or the memory-mapped cache), in `workers` processes when asked,
pinned and copied without blocking. The sampler decides the order, as with a DataLoader (shuffled,
class-balanced or sharded across ranks); the augmentation draws from a generator seeded by (seed, epoch, rank),
so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

RESIDENT_FRACTION = 0.25


class DeviceLoader:
    """Batches of an `ImageRows` dataset through its `batch_transform`, on `device`.

    Args:
        dataset: a `vit.data.ImageRows` with a `batch_transform`.
        sampler: the order of one epoch (with `set_epoch`, like a DistributedSampler).
        batch_size: images per batch.
        device: where batches are made.
        drop_last: drop a last, incomplete batch.
        seed: seed of the augmentation, with the epoch and the rank.
        rank: this process's rank.
        workers: host processes that gather batches when the images are not held on the device.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: Any,
        batch_size: int,
        device: torch.device,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        workers: int = 0,
    ) -> None:
        if dataset.batch_transform is None:
            raise ValueError("this dataset augments per image; read it through a DataLoader")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.device, self.drop_last, self.seed, self.rank, self.workers = device, drop_last, seed, rank, workers
        self.epoch = 0
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None
        self._host: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.rank
        generator = torch.Generator().manual_seed(seed % 2**63)
        transform = self.dataset.batch_transform
        sizes = self.dataset.decoded.sizes
        if self.holds_images():
            images, targets = self._on_device()
            for batch in BatchSampler(self.sampler, self.batch_size, self.drop_last):
                index = torch.as_tensor(batch)
                on_device = index.to(self.device, non_blocking=True)
                yield transform(images.index_select(0, on_device), sizes[index], generator), targets[on_device]
            return
        for images, batch_sizes, targets in self._host_loader():
            images = images.to(self.device, non_blocking=True)
            yield transform(images, batch_sizes, generator), targets.to(self.device, non_blocking=True)

    def holds_images(self) -> bool:
        """Whether the images are held on the device (see the module docstring)."""
        if self.device.type == "cpu" or self._held is not None:
            return True
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.dataset.decoded.nbytes <= RESIDENT_FRACTION * free

    def _on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._held is None:
            images = self.dataset.decoded.images.to(self.device)
            self._held = images, torch.as_tensor(self.dataset.targets, dtype=torch.int64, device=self.device)
        return self._held

    def _host_loader(self) -> DataLoader:
        if self._host is None:
            self._host = DataLoader(
                _Gather(self.dataset.decoded, self.dataset.targets),
                sampler=BatchSampler(self.sampler, self.batch_size, self.drop_last),
                batch_size=None,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
            )
        return self._host


class _Gather:
    """Maps a list of indices to one uint8 batch, its images' sizes and targets (for a host DataLoader)."""

    def __init__(self, decoded: Any, targets: list[int]) -> None:
        self.decoded, self.targets = decoded, torch.as_tensor(targets, dtype=torch.int64)

    def __getitem__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(batch)
        return self.decoded.images.index_select(0, index), self.decoded.sizes[index], self.targets[index]
