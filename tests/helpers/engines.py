"""The export and engine tests' tiny ViT and its random inputs (test_deploy_export, test_deploy_openvino), and a tiny
release with a torch-aot engine (test_deploy_torch_aot, test_pyfunc_torch_aot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

AOT_CLASSES = ["bolt", "nut", "washer", "gear", "pin"]


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


def aot_release(folder: Path, precision: str, device: str, fallback: str = "compile") -> tuple[Path, Path, object]:
    """`tiny_vit()` as a model folder (ImageNet normalisation, crop 0.875) and its torch-aot engine built here at
    `folder/engines/torch-aot/<precision>.zip` (max batch 64); returns both and the engine's parity report."""
    from vitops.deploy.parity import torch_logits
    from vitops.deploy.torch_aot import build_aot_engine, make_plan
    from vitops.vit.bundle import ModelMeta, save_bundle

    model = tiny_vit(num_classes=len(AOT_CLASSES))
    meta = ModelMeta(
        "vit_tiny_patch16_224", AOT_CLASSES, 32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        crop_pct=0.875, model_kwargs={"patch_size": 8, "depth": 2},
    )  # fmt: skip
    model_dir = save_bundle(model, meta, folder / "model")
    x = images(64)
    plan = make_plan(precision, device, (3, 32, 32), max_batch=64, fallback=fallback)
    out = folder / "engines" / "torch-aot" / f"{plan.precision}.zip"
    engine, report = build_aot_engine(model, out, x, torch_logits(model, x), plan, 0.98)
    return model_dir, engine, report
