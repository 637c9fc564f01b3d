"""Augmentation of whole batches on the training device (GPU or CPU), from decoded uint8 images.

The recipe is timm's training transform (`vit.data.create_transforms`), drawn per image as timm draws it but
applied to the whole batch at once:

- RandomResizedCrop: timm's parameters (area fraction in `scale_min`..1, log-uniform aspect ratio in 3/4..4/3,
  ten tries, then the central crop), one crop per image, and the crop, the resize to the input size and the
  horizontal flip (`hflip`) done by one `grid_sample` over the batch in the model's interpolation;
- colour jitter: brightness, contrast and saturation factors in [1 - s, 1 + s], in a random order per image,
  as torchvision's ColorJitter computes them;
- normalisation with the model's mean and std, then random erasing (`re_prob`: one rectangle of 2-33 % of the
  image, aspect 0.3-3.3, filled with 0), as timm's RandomErasing.

torchvision's v2 transforms draw one set of parameters per call, so on a batch they would give every image the
same crop and jitter; hence the parameters here are drawn per image and applied by batched tensor operations.
They are drawn on the CPU from a generator the caller seeds (per epoch and rank), so a run is repeatable, on
any device, whatever the loader's workers do. Mixup/CutMix (`timm.data.Mixup`) then runs on the augmented batch
in the training loop, on the same device. RandAugment and AutoAugment have no batched form here: with
`auto_augment` set, the loader applies timm's per-image transforms instead (`augment_on: loader`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

_GRID_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


class Normalise:
    """uint8 (B, 3, H, W) to float32 (x / 255 - mean) / std: the tensor steps of timm's eval transform, in the
    same operations (ToTensor's division, then Normalize's), so a CPU batch equals the per-image result bit for bit.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None, generator: object = None):
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return images.to(torch.float32).div(255).sub_(mean).div_(std)


class BatchAugment:
    """timm's training transform for a whole batch on its device (see the module docstring).

    Args:
        img_size: output side.
        interpolation: the model's (timm's name); bicubic, bilinear or nearest (others: bicubic).
        mean: normalisation mean per channel.
        std: normalisation std per channel.
        scale_min: smallest crop area fraction.
        hflip: horizontal flip probability.
        color_jitter: brightness, contrast and saturation strength; 0 turns it off.
        re_prob: random-erasing probability.
    """

    ratio = (3 / 4, 4 / 3)

    def __init__(
        self,
        img_size: int,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        scale_min: float = 0.8,
        hflip: float = 0.0,
        color_jitter: float = 0.0,
        re_prob: float = 0.0,
    ) -> None:
        self.img_size, self.mode = img_size, _GRID_MODES.get(interpolation, "bicubic")
        self.normalise = Normalise(mean, std)
        self.scale, self.hflip, self.color_jitter, self.re_prob = (scale_min, 1.0), hflip, color_jitter, re_prob

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator | None = None):
        """Augment uint8 images (B, 3, S, S), each filling the top-left `sizes[b]` (height, width) of its square.

        Returns:
            float32 (B, 3, img_size, img_size), normalised, on the images' device.
        """
        b, _, side_h, side_w = images.shape
        device = images.device
        top, left, height, width = sample_crops(sizes.cpu(), self.scale, self.ratio, generator)
        flip = torch.rand(b, generator=generator) < self.hflip
        # Output pixel centres u in [-1, 1] map to the crop: x = (w / S) u + (2 left + w) / S - 1 (align_corners
        # False), mirrored for a flip.
        sx, sy = width / side_w, height / side_h
        theta = torch.zeros(b, 2, 3, dtype=torch.float32)
        theta[:, 0, 0] = torch.where(flip, -sx, sx)
        theta[:, 0, 2] = (2 * left + width) / side_w - 1
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = (2 * top + height) / side_h - 1
        jitter = self._jitter_params(b, generator) if self.color_jitter > 0 else None
        erase = sample_erasing(b, self.img_size, self.re_prob, generator) if self.re_prob > 0 else None

        grid = F.affine_grid(theta.to(device, non_blocking=True), [b, 3, self.img_size, self.img_size], False)
        x = F.grid_sample(images.float(), grid, mode=self.mode, padding_mode="border", align_corners=False)
        x = x.clamp_(0, 255).round_()  # what a uint8 resize gives
        if jitter is not None:
            x = _color_jitter(x.div_(255), *(t.to(device, non_blocking=True) for t in jitter)).mul_(255)
        x = self.normalise(x)
        if erase is not None:
            x = x.masked_fill(_box_mask(*(t.to(device, non_blocking=True) for t in erase), self.img_size), 0.0)
        return x

    def _jitter_params(self, b: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.color_jitter
        lo = max(0.0, 1.0 - s)
        factors = lo + torch.rand(b, 3, generator=generator) * (1.0 + s - lo)  # brightness, contrast, saturation
        order = torch.rand(b, 3, generator=generator).argsort(dim=1)  # a random order per image
        return factors, order


def sample_crops(
    sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> tuple[torch.Tensor, ...]:
    """timm's RandomResizedCrop parameters for every image: (top, left, height, width), float tensors of whole
    pixels. Ten tries per image of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; the
    first that fits wins, else the central crop of the nearest allowed aspect ratio."""
    tries = 10
    img_h, img_w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    n = sizes.shape[0]
    fraction = scale[0] + torch.rand(n, tries, generator=generator, dtype=torch.float64) * (scale[1] - scale[0])
    area = img_h * img_w * fraction
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + torch.rand(n, tries, generator=generator, dtype=torch.float64) * (log_hi - log_lo))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w <= img_w) & (h <= img_h)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    img_h, img_w = img_h.squeeze(1), img_w.squeeze(1)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (img_h - h + 1)).clamp(max=img_h - h)
    left = torch.floor(u[:, 1] * (img_w - w + 1)).clamp(max=img_w - w)
    # The fallback: the whole image, or its central crop at the nearest allowed aspect ratio.
    in_ratio = img_w / img_h
    fw = torch.where(in_ratio > ratio[1], torch.round(img_h * ratio[1]), img_w)
    fh = torch.where(in_ratio < ratio[0], torch.round(img_w / ratio[0]), img_h)
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.where(found, top, torch.div(img_h - fh, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(img_w - fw, 2, rounding_mode="floor"))
    return top.float(), left.float(), h.float(), w.float()


def sample_erasing(b: int, side: int, prob: float, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """timm's RandomErasing rectangles (const mode, one per image): (top, left, height, width) as float tensors;
    an image that is not erased (probability 1 - `prob`, or no fitting try) gets an empty rectangle."""
    tries = 10
    area = side * side * (0.02 + torch.rand(b, tries, generator=generator) * (1 / 3 - 0.02))
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    aspect = torch.exp(log_lo + torch.rand(b, tries, generator=generator) * (log_hi - log_lo))
    h = torch.round(torch.sqrt(area * aspect))
    w = torch.round(torch.sqrt(area / aspect))
    ok = (w < side) & (h < side)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
    erase = ok.any(dim=1) & (torch.rand(b, generator=generator) < prob)
    h = torch.where(erase, h.gather(1, first).squeeze(1), torch.zeros(b))
    w = torch.where(erase, w.gather(1, first).squeeze(1), torch.zeros(b))
    u = torch.rand(b, 2, generator=generator)
    top = torch.floor(u[:, 0] * (side - h + 1)).clamp(max=side - h)
    left = torch.floor(u[:, 1] * (side - w + 1)).clamp(max=side - w)
    return top, left, h, w


def _box_mask(top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, side: int) -> torch.Tensor:
    """(B, 1, side, side) True inside each image's rectangle."""
    pos = torch.arange(side, device=top.device, dtype=top.dtype)
    rows = (pos[None, :] >= top[:, None]) & (pos[None, :] < (top + h)[:, None])
    cols = (pos[None, :] >= left[:, None]) & (pos[None, :] < (left + w)[:, None])
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def _color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation on float images in [0, 1], per image in its own order (as
    torchvision's ColorJitter: blend with black, the mean grey level, the grey image; clamped to [0, 1])."""
    view = (-1, 1, 1, 1)
    for position in range(3):
        op = order[:, position].view(view)
        gray = _grayscale(x)
        b, c, s = (factors[:, k].view(view) for k in range(3))
        bright = x * b
        contrast = x * c + gray.mean(dim=(1, 2, 3), keepdim=True) * (1 - c)
        saturate = x * s + gray * (1 - s)
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, saturate)).clamp_(0, 1)
    return x


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)
