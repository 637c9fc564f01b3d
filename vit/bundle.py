"""A trained model as a folder of plain files: `weights.safetensors` plus `model.json`.

This is the hand-off format between stages: `vitops train` writes it, `vitops evaluate`, the ONNX export
and the MLflow registry read it, and `file:<folder>` or `mlflow:models:/...` sources resolve to it. No
pickles: weights are safetensors and everything needed to rebuild the network is in `model.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitops.common.files import atomic_write

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"


class BundleError(ValueError):
    """A model folder that is missing, incomplete or does not match its weights."""


@dataclass
class ModelMeta:
    """How to rebuild and feed a trained network.

    Attributes:
        model: timm architecture name, e.g. `vit_tiny_patch16_224`.
        classes: class names in logit order.
        img_size: square input side in pixels.
        mean: per-channel normalisation mean (RGB, 0..1 scale).
        std: per-channel normalisation std.
        interpolation: resize interpolation the model was trained with.
        crop_pct: centre-crop fraction used at evaluation.
        model_kwargs: extra `timm.create_model` arguments (patch_size, depth, ...).
        extra: free-form provenance (source, data version, metrics).
    """

    model: str
    classes: list[str]
    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild the architecture with `timm.create_model`."""
        kwargs: dict[str, Any] = {"num_classes": self.num_classes, **self.model_kwargs}
        if _takes_img_size(self.model):
            kwargs.setdefault("img_size", self.img_size)
        return kwargs


def _takes_img_size(model_name: str) -> bool:
    # CNNs (resnet, convnext, ...) take any input size and reject an img_size argument.
    return any(model_name.startswith(p) for p in ("vit_", "deit", "eva", "beit", "swin", "vit", "levit"))


def save_bundle(model: nn.Module, meta: ModelMeta, out_dir: Path) -> Path:
    """Write weights and metadata into `out_dir`, each file atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    text = json.dumps(asdict(meta), indent=2, sort_keys=True)
    atomic_write(out_dir / META_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out_dir


def read_meta(bundle_dir: Path) -> ModelMeta:
    """Read `model.json` of a model folder."""
    path = Path(bundle_dir) / META_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a vitops model folder (no {META_FILE}); train one with `vitops train`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["mean"] = tuple(raw["mean"])
        raw["std"] = tuple(raw["std"])
        return ModelMeta(**raw)
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise BundleError(f"{path}: unreadable model metadata ({err}); retrain or restore this folder") from err


def load_bundle(bundle_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild the network of a model folder and load its weights (strictly), in eval mode."""
    import timm
    from safetensors.torch import load_file

    meta = read_meta(bundle_dir)
    weights = Path(bundle_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{bundle_dir}: {WEIGHTS_FILE} is missing; retrain or restore this folder")
    model = timm.create_model(meta.model, pretrained=False, **meta.create_kwargs())
    try:
        model.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    except RuntimeError as err:
        raise BundleError(f"{weights}: weights do not match {meta.model} as described in {META_FILE}: {err}") from err
    return model.to(device).eval(), meta
