"""Tiny data, models and parameter files shared by the vit/train tests (tests/test_vit_fixtures.py checks them),
and the tiny training run of the training-loop and distillation tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

if TYPE_CHECKING:
    import torch

    from vitops.vit.train import FitResult, TrainConfig

TINY_VIT = {"patch_size": 8, "depth": 2}
TINY_KW = {**TINY_VIT, "embed_dim": 32, "num_heads": 2}


def write_digits(root: Path, size: int = 60) -> pd.DataFrame:
    """Write `size` real digit PNGs (32x32, 10 classes) under `root`; return rows split 60/20/20 by position."""
    from vitops.data_checks.sample import write_sample

    write_sample(root, size=size)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths]})
    rank = rows.groupby("label").cumcount() % 5
    rows["split"] = rank.map({0: "val", 1: "test"}).fillna("train")
    return rows


def write_manifest(root: Path, path: Path) -> Path:
    """Scan `root` with the data gate's scanner and write its manifest CSV."""
    from vitops.data_checks.manifest import scan_dataset
    from vitops.data_checks.manifest import write_manifest as write

    return write(scan_dataset(root, {"train": 0.6, "val": 0.2, "test": 0.2}, workers=1), path)


def write_tiny_checkpoint(path: Path, num_classes: int = 7, **kwargs) -> dict:
    """Save a random tiny ViT as safetensors (a stand-in for downloaded weights); return its state dict."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=32, **{**TINY_VIT, **kwargs})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def write_params(tmp: Path, data: Path, manifest: Path, source: Path, **train) -> Path:
    """A params.yaml for a tiny CPU run of `vitops train` / `vitops evaluate` under `tmp`."""
    params = {
        "data": {"raw_dir": str(data)},
        "validate": {"manifest": str(manifest), "report": str(tmp / "report.json")},
        "train": {
            "source": f"file:{source}",
            "img_size": 32,
            **TINY_VIT,
            "epochs": 2,
            "batch_size": 8,
            "warmup_epochs": 0.5,
            "out_dir": str(tmp / "out" / "vit"),
            **train,
        },
        "baseline": {"epochs": 1, "out_dir": str(tmp / "out" / "baseline")},
        "evaluate": {"out_dir": str(tmp / "out" / "eval")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    path = tmp / "params.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def tiny_model() -> torch.nn.Module:
    """A seeded tiny ViT for 10 digit classes at 32x32."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **TINY_KW)


def fit_tiny(data: tuple, cfg: TrainConfig, ckpt: Path, **kwargs) -> tuple[torch.nn.Module, FitResult]:
    """Train `tiny_model()` on `data` (train and val datasets) with `cfg`, checkpoints in `ckpt`."""
    from vitops.vit.train import fit

    model = tiny_model()
    train, val = data
    result = fit(model, train, val, cfg, ckpt, num_classes=10, targets=train.targets, **kwargs)
    return model, result
