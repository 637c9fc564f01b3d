"""A fixed, seeded corruption suite for the test split: how a model holds up when the camera, the lighting, the
compression or the resize setting of a line changes.

Every corruption works on the decoded evaluation input (uint8 (N, 3, S, S), already resized and cropped the way
the model sees it), through `torchvision.transforms.v2.functional`, with one severity each (`Severities`, from
`robustness` in params.yaml; None leaves a corruption out):

| name | what | severity |
| --- | --- | --- |
| `blur` | Gaussian blur (kernel 2 x ceil(3 sigma) + 1) | sigma in pixels |
| `noise` | additive Gaussian noise, clipped | std on the 0..1 scale |
| `jpeg` | JPEG round trip (Pillow, 4:2:0) | quality 1..100 |
| `brightness` | darker (or brighter) image | factor, 1 = unchanged |
| `contrast` | flatter (or stronger) contrast | factor, 1 = unchanged |
| `resize` | down to a fraction of the side (antialiased), back up with nearest neighbour | fraction 0..1 |
| `rotate` | rotation about the centre, edges filled with the border value 0 | degrees |
| `shift` | translation right and down | pixels |

The noise is drawn from a generator seeded with `seed` (and nothing else is random), so the suite gives the
same images on every run and machine: the KPI gate's robustness check compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

CORRUPTIONS = ("blur", "noise", "jpeg", "brightness", "contrast", "resize", "rotate", "shift")


@dataclass(frozen=True)
class Severities:
    """One severity per corruption (see the module docstring); None leaves it out of the suite."""

    blur: float | None = 0.8
    noise: float | None = 0.05
    jpeg: int | None = 30
    brightness: float | None = 0.6
    contrast: float | None = 0.5
    resize: float | None = 0.25
    rotate: float | None = 10.0
    shift: int | None = 2
    seed: int = 0

    def active(self) -> dict[str, float]:
        """The corruptions of the suite, in `CORRUPTIONS` order, with their severities."""
        values = asdict(self)
        return {name: values[name] for name in CORRUPTIONS if values[name] is not None}


def corrupt(images: torch.Tensor, name: str, severity: float, seed: int = 0) -> torch.Tensor:
    """One corruption of a uint8 batch (N, 3, H, W); returns a new uint8 batch of the same shape.

    Raises:
        ValueError: an unknown corruption name.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"corrupt takes uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if name == "blur":
        radius = max(1, math.ceil(3 * float(severity)))
        return TF.gaussian_blur(images, [2 * radius + 1] * 2, [float(severity)] * 2)
    if name == "noise":
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(images.shape, generator=generator) * (255.0 * float(severity))
        return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)
    if name == "jpeg":  # Pillow's libjpeg: torchvision's own JPEG codec is deprecated since 0.29
        return torch.stack([_jpeg(image, int(severity)) for image in images])
    if name == "brightness":
        return TF.adjust_brightness(images, float(severity))
    if name == "contrast":
        return TF.adjust_contrast(images, float(severity))
    if name == "resize":
        small = [max(1, round(h * float(severity))), max(1, round(w * float(severity)))]
        down = TF.resize(images, small, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.resize(down, [h, w], interpolation=InterpolationMode.NEAREST)
    if name == "rotate":
        return TF.rotate(images, float(severity), interpolation=InterpolationMode.BILINEAR)
    if name == "shift":
        step = int(severity)
        return TF.affine(images, angle=0.0, translate=[step, step], scale=1.0, shear=[0.0, 0.0])
    raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as decoded:
        return torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()).permute(2, 0, 1)


def corruption_suite(images: torch.Tensor, severities: Severities) -> dict[str, torch.Tensor]:
    """Every active corruption of `images`, by name (deterministic: the same input gives the same output)."""
    return {name: corrupt(images, name, level, severities.seed) for name, level in severities.active().items()}


@torch.no_grad()
def predict_uint8(
    model: nn.Module, images: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256
) -> np.ndarray:
    """Softmax probabilities (N, C) of uint8 images normalised the way the model's evaluation input is."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(normalise(images[i : i + batch_size].to(device))).float().softmax(dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy()


def robustness_top1(
    model: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    severities: Severities,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 on the clean images (`clean`) and on each corruption of the suite (fractions 0..1)."""
    labels = np.asarray(labels)
    out = {"clean": float((predict_uint8(model, images, normalise, batch_size).argmax(1) == labels).mean())}
    for name, corrupted in corruption_suite(images, severities).items():
        out[name] = float((predict_uint8(model, corrupted, normalise, batch_size).argmax(1) == labels).mean())
    return out


def drops(top1: dict[str, float]) -> dict[str, float]:
    """Each corruption's drop from the clean top-1, in points (positive = worse under the corruption)."""
    return {name: (top1["clean"] - value) * 100.0 for name, value in top1.items() if name != "clean"}
