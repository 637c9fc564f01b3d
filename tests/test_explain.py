"""Heatmaps have the image's size, and on a toy task they highlight the planted discriminative patch; the grid is
a PNG; a CNN is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vitops.vit.explain import ExplainError, heatmaps, write_grid


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise; class 1 carries a bright 8 x 8 patch at rows 8-15, columns 16-23 (one patch of the 4 x 4 grid)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.5, (n, 3, 32, 32)).astype(np.float32)
    y = np.arange(n) % 2
    x[y == 1, :, 8:16, 16:24] += 2.5
    return torch.from_numpy(x), torch.from_numpy(y)


def test_heatmaps_have_the_image_size_and_find_the_planted_patch() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=2)
    x, y = _toy(64, 0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    test, labels = _toy(16, 1)
    maps, probs = heatmaps(model, test)
    assert maps.shape == (16, 32, 32) and probs.shape == (16, 2)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert (probs.argmax(1) == labels.numpy()).mean() == 1.0
    planted = maps[labels.numpy() == 1]
    inside = planted[:, 8:16, 16:24].mean(axis=(1, 2))
    outside = (planted.sum(axis=(1, 2)) - planted[:, 8:16, 16:24].sum(axis=(1, 2))) / (32 * 32 - 64)
    assert (inside > 2 * outside).all()
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in planted]
    assert all(8 <= r < 16 and 16 <= c < 24 for r, c in peaks)
    assert all(block.fused_attn == model.blocks[0].attn.fused_attn for block in (b.attn for b in model.blocks))


def test_a_cnn_is_refused_and_the_grid_is_a_png(tmp_path: Path) -> None:
    import timm

    cnn = timm.create_model("resnet10t", num_classes=2)
    with pytest.raises(ExplainError, match="no attention blocks"):
        heatmaps(cnn, torch.zeros(1, 3, 32, 32))
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    items = [
        {"image": image, "heatmap": np.ones((32, 32)), "label": "1", "pred": "7", "confidence": 0.8},
        {"image": image, "heatmap": None, "label": None, "pred": "2", "confidence": 0.5, "name": "x.png"},
    ]
    assert write_grid(tmp_path / "grid.png", items).read_bytes()[:4] == b"\x89PNG"


def test_vitops_explain_on_a_model_folder_writes_the_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import timm
    from helpers.data import write_png

    from vitops.flows.cli import main
    from vitops.vit.bundle import ModelMeta, save_bundle

    meta = ModelMeta(model="vit_tiny_patch16_224", classes=["a", "b"], img_size=32,
                     model_kwargs={"patch_size": 8, "depth": 2})  # fmt: skip
    torch.manual_seed(0)
    folder = save_bundle(timm.create_model(meta.model, **meta.create_kwargs()), meta, tmp_path / "model")
    images = [write_png(tmp_path / "one.png", 1, (40, 30)), write_png(tmp_path / "two.png", 2)]
    out = tmp_path / "heat.png"
    assert main(["explain", str(folder), *map(str, images), "--out", str(out), "--target", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{images[0]}: ") and lines[-1] == f"heatmaps {out}"
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", str(folder), str(tmp_path / "missing.png")]) == 2
    assert main(["explain", str(folder), str(images[0]), "--target", "zebra"]) == 2
