"""Where a Vision Transformer looked: gradient-weighted attention rollout heatmaps, and a picture grid of them.

`heatmaps(model, images)` runs the timm ViT with its fused attention turned off (so each block's softmax
attention is a tensor that can be read), back-propagates the predicted (or given) class's logit, and rolls the
gradient-weighted attention up through the blocks (Chefer, Gur and Wolf 2021, "Generic attention-model
explainability"): R = I; per block R += mean_heads(relu(dA * A)) @ R. The class token's row of R over the patch
tokens, upsampled to the image's size and scaled to 0..1, is the heatmap: class-specific, unlike plain rollout.

Why not Grad-CAM through `pytorch-grad-cam`: its only release is an sdist that requires `opencv-python` (the GUI
build, which needs libGL on a line-side server) and `ttach`; the rollout needs nothing beyond torch and timm.
Models without attention blocks (the CNN baseline) raise `ExplainError`.

`write_grid` draws images with their heatmaps, each titled with label, prediction and confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ExplainError(ValueError):
    """A model or input the heatmaps cannot be computed for."""


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """timm's attention modules of a ViT, in order (empty for a CNN)."""
    found = [m for m in model.modules() if hasattr(m, "fused_attn")]
    return [m for m in found if isinstance(getattr(m, "attn_drop", None), nn.Module)]


def heatmaps(
    model: nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, H, W) in 0..1 for normalised images (N, 3, H, W), and the probabilities (N, C).

    Args:
        model: a timm Vision Transformer (class token, patch grid).
        images: the evaluation input.
        targets: the class each heatmap explains; None: the predicted class.

    Raises:
        ExplainError: the model has no attention blocks or no patch grid.
    """
    blocks = attention_blocks(model)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not blocks or grid is None:
        raise ExplainError(f"{type(model).__name__} has no attention blocks: heatmaps need a timm ViT")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    attentions: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        attentions.append(output)

    fused = [b.fused_attn for b in blocks]
    hooks = [b.attn_drop.register_forward_hook(keep) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        for b in blocks:
            b.fused_attn = False  # the softmax attention as a tensor, not inside scaled_dot_product_attention
        with torch.enable_grad():
            logits = model(images).float()
            chosen = logits.argmax(1) if targets is None else torch.as_tensor(list(targets), device=logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        for b, f in zip(blocks, fused, strict=True):
            b.fused_attn = f
        for h in hooks:
            h.remove()
        model.train(was_training)
    tokens = attentions[0].shape[-1]
    rollout = torch.eye(tokens, device=images.device).expand(images.shape[0], tokens, tokens).clone()
    for attn in attentions:
        weighted = (attn.grad * attn).clamp(min=0).mean(dim=1).detach()
        rollout = rollout + weighted @ rollout
    cls = rollout[:, 0, prefix:].reshape(-1, 1, *grid)
    maps = F.interpolate(cls, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    maps = (maps - low) / (high - low).clamp(min=1e-12)
    return maps.cpu().numpy(), logits.softmax(1).detach().cpu().numpy()


def write_grid(out: Path, items: list[dict[str, Any]], columns: int = 4) -> Path:
    """A picture grid: each image (uint8 H x W x 3) with its heatmap over it (when given) and a title with the
    label (when known), the prediction and its confidence.

    Args:
        out: the PNG to write.
        items: dicts with `image`, `heatmap` (H x W in 0..1, or None), `pred`, `confidence`, `label` (or None)
            and optionally `name`.
        columns: pictures per row.
    """
    from vitops.vit.evaluate import _pyplot, _save

    plt = _pyplot()
    n = max(len(items), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, item in zip(axes.flat, items, strict=False):
        ax.imshow(item["image"])
        if item.get("heatmap") is not None:
            ax.imshow(item["heatmap"], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        label = item.get("label")
        head = f"label {label}, " if label is not None else ""
        wrong = label is not None and str(label) != str(item["pred"])
        title = f"{head}pred {item['pred']} ({item['confidence'] * 100:.0f} %)"
        if item.get("name"):
            title = f"{item['name']}\n{title}"
        ax.set_title(title, fontsize=8, color="red" if wrong else "black")
    return _save(fig, Path(out))


def explain_images(model: nn.Module, meta: Any, rgb: list[np.ndarray], targets: Sequence[int] | None = None) -> Any:
    """Heatmaps of RGB uint8 images already at the model's input size (H x W x 3): (heatmaps, probabilities)."""
    from vitops.vit.augment import Normalise

    batch = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous()
    device = next(model.parameters()).device
    return heatmaps(model, Normalise(meta.mean, meta.std)(batch.to(device)), targets)
