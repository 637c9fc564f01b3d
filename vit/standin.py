"""The offline quickstart's stand-in for public pretrained weights: a ViT pretrained on rendered characters.

Real use starts from public weights (`hf-hub:timm/...`). A machine without internet has none, so the
quickstart first builds its own "external" checkpoint in a separate, clearly labelled step: a short
pretraining of the same ViT architecture on a larger generated set of rendered letters, digits and symbols
(Pillow's bundled TrueType font at random sizes, positions, rotations, shears, stroke widths, resolutions,
polarity and noise). The result is an ordinary `.safetensors` file whose metadata says what it is; fine-tuning
reads it through the normal `file:` source like any downloaded checkpoint.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# Digits, capitals, and the small letters whose shape differs from their capital (size-normalised, "o" and "O"
# would be the same image under two labels).
CHARSET = string.digits + string.ascii_uppercase + "abdefghijmnqrty"
STANDIN_NOTICE = (
    "vitops offline stand-in: NOT public pretrained weights. Pretrained by `vitops pretrain-standin` on "
    "generated images of rendered characters so that the quickstart can run without internet."
)


@dataclass
class StandinSpec:
    """What to pretrain.

    Attributes:
        model: timm ViT architecture name.
        img_size: square input side.
        patch_size: ViT patch size.
        depth: number of transformer blocks.
        embed_dim: token width; None keeps the architecture's.
        images: number of generated training images.
        epochs: pretraining epochs.
        batch_size: images per step.
        lr: peak AdamW learning rate.
        seed: seed of the renderer and the training.
    """

    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int = 6
    embed_dim: int | None = None
    images: int = 30000
    epochs: int = 12
    batch_size: int = 64
    lr: float = 5e-4
    seed: int = 0

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"patch_size": self.patch_size, "depth": self.depth}
        if self.embed_dim:
            kwargs["embed_dim"] = self.embed_dim
        return kwargs


# Fonts that matplotlib (a vitops dependency) ships, with complete digit and Latin letter glyphs: sans, mono,
# serif and Computer Modern faces in regular, bold and italic cuts. Pillow's own bundled font is added to them.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)  # fmt: skip


def _load_fonts(size: int) -> list[Any]:
    """Pillow's bundled font and every font of `FONT_FILES` that matplotlib ships, at `size` pixels."""
    from PIL import ImageFont

    fonts = [ImageFont.load_default(size=size)]
    try:
        import matplotlib

        font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    except ImportError:  # still renders, with one font
        log.warning("matplotlib is not installed: the stand-in is rendered with Pillow's font only")
        return fonts
    fonts += [ImageFont.truetype(str(font_dir / name), size) for name in FONT_FILES if (font_dir / name).is_file()]
    return fonts


def _glyph(font: Any, char: str, stroke: int) -> Any:
    """The character cropped to its ink, white on black; None when the font has no visible glyph for it."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(img).text((48, 48), char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    box = img.getbbox()
    return img.crop(box) if box else None


def render_characters(count: int, img_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render `count` random characters from `CHARSET` as grayscale images.

    Each glyph comes from one of ~23 fonts, is scaled to fill a random share of the frame (as scanned forms
    and size-normalised character sets do), then sheared, rotated, warped by a random smooth mesh (like
    handwriting), thickened or thinned, blurred, reduced to a random low resolution and back, and given
    random contrast, noise and polarity.

    Returns:
        uint8 images (count, img_size, img_size) and int64 labels (indices into `CHARSET`).
    """
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    canvas = 48
    fonts = _load_fonts(40)
    labels = rng.integers(0, len(CHARSET), size=count)
    out = np.empty((count, img_size, img_size), dtype=np.uint8)
    cells = 3
    step = canvas / cells
    grid = [(gx * step, gy * step) for gy in range(cells + 1) for gx in range(cells + 1)]
    for i, label in enumerate(labels):
        glyph = None
        while glyph is None:  # a font without this glyph: take another font
            glyph = _glyph(fonts[int(rng.integers(len(fonts)))], CHARSET[label], int(rng.integers(0, 3)))
        height = canvas * rng.uniform(0.65, 0.95)
        width = min(canvas * 0.95, max(4.0, height * glyph.width / glyph.height * rng.uniform(0.7, 1.4)))
        glyph = glyph.resize((int(width), int(height)), Image.BILINEAR)
        img = Image.new("L", (canvas, canvas), 0)
        img.paste(glyph, (int(rng.uniform(0, canvas - glyph.width)), int(rng.uniform(0, canvas - glyph.height))))
        shear = float(rng.uniform(-0.2, 0.2))
        img = img.transform(img.size, Image.Transform.AFFINE, (1, shear, -shear * canvas / 2, 0, 1, 0), Image.BILINEAR)
        img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
        # Piecewise-affine warp: every inner mesh vertex is moved at random, the border stays in place.
        moved = [
            (x, y) if x in (0, canvas) or y in (0, canvas) else (x + rng.normal(0, 1.5), y + rng.normal(0, 1.5))
            for x, y in grid
        ]
        mesh = []
        for gy in range(cells):
            for gx in range(cells):
                k = gy * (cells + 1) + gx
                quad = (*moved[k], *moved[k + cells + 1], *moved[k + cells + 2], *moved[k + 1])
                box = (int(gx * step), int(gy * step), int((gx + 1) * step), int((gy + 1) * step))
                mesh.append((box, tuple(float(v) for v in quad)))
        img = img.transform(img.size, Image.Transform.MESH, mesh, Image.BILINEAR)
        thickness = rng.random()
        if thickness < 0.3:
            img = img.filter(ImageFilter.MaxFilter(3))
        elif thickness < 0.4:
            img = img.filter(ImageFilter.MinFilter(3))
        if rng.random() < 0.2:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
        # Random low resolution then back up: small scanned or thumbnail images look like this.
        low = int(rng.integers(8, img_size // 2 + 1)) if rng.random() < 0.7 else img_size
        img = img.resize((low, low), Image.BOX).resize((img_size, img_size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        contrast = rng.uniform(0.6, 1.0)
        arr = arr * contrast + rng.uniform(0, 1 - contrast) + rng.normal(0, rng.uniform(0, 0.06), arr.shape)
        if rng.random() < 0.5:
            arr = 1.0 - arr
        out[i] = np.clip(arr * 255.0, 0, 255).astype(np.uint8)
    return out, labels.astype(np.int64)


def _to_dataset(images: np.ndarray, labels: np.ndarray, mean: float = 0.5, std: float = 0.5) -> Any:
    from torch.utils.data import TensorDataset

    x = torch.from_numpy(images).float().div_(255.0).sub_(mean).div_(std)
    return TensorDataset(x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels))


def pretrain_standin(spec: StandinSpec, out: Path, work_dir: Path | None = None, show_progress: bool = True) -> dict:
    """Pretrain the stand-in checkpoint and write it to `out` (.safetensors) with a JSON description beside it.

    Args:
        spec: architecture and pretraining settings.
        out: the safetensors file to write.
        work_dir: folder for the pretraining's own checkpoints (default: next to `out`).
        show_progress: draw progress bars.

    Returns:
        The description written next to the weights (spec, validation accuracy, notice).
    """
    import timm
    from safetensors.torch import save_file

    from vitops.common.files import atomic_write, sha256_file
    from vitops.vit.train import TrainConfig, fit

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir or out.parent / f".{out.stem}-work")
    train_x, train_y = render_characters(spec.images, spec.img_size, seed=spec.seed)
    val_x, val_y = render_characters(max(500, spec.images // 20), spec.img_size, seed=spec.seed + 1_000_003)
    torch.manual_seed(spec.seed)
    model = timm.create_model(
        spec.model, pretrained=False, num_classes=len(CHARSET), img_size=spec.img_size, **spec.model_kwargs()
    )
    cfg = TrainConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        layer_decay=None,
        weight_decay=0.05,
        warmup_epochs=min(1.0, spec.epochs / 4),
        label_smoothing=0.1,
        class_balance="none",
        patience=0,
        seed=spec.seed,
    )
    # Always starts afresh; `fit` leaves the weights of the best epoch on the held-out rendered characters.
    result = fit(
        model,
        _to_dataset(train_x, train_y),
        _to_dataset(val_x, val_y),
        cfg,
        work_dir,
        num_classes=len(CHARSET),
        overwrite=True,
        show_progress=show_progress,
    )
    info = {
        "notice": STANDIN_NOTICE,
        "spec": asdict(spec),
        "classes": list(CHARSET),
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "val_top1": result.best.get("val_top1"),
        "epochs_run": result.epochs_run,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "vitops_standin": "true", "notice": STANDIN_NOTICE, "model": spec.model}
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata=metadata))
    info["weights_sha256"] = sha256_file(out)  # what a shipped copy is checked against
    description = out.with_suffix(".json")
    atomic_write(description, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2), encoding="utf-8"))
    return info
