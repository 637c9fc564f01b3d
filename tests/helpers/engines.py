"""The export and engine tests' tiny ViT and its random inputs (test_deploy_export, test_deploy_openvino)."""

from __future__ import annotations

import numpy as np
import torch


def tiny_vit(num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A 2-block ViT at 32x32 whose head is scaled up, so its logits have margins like a trained model's."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=num_classes, pretrained=False
    )
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return model.eval()


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)
