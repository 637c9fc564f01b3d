"""The input pipeline against the one before it: the quickstart recipe must reach the same top-1 either way.

    python bench/pipeline_parity.py [--device cpu|cuda] [--seeds 3] [--epochs N] [--json FILE]

Fine-tunes the quickstart recipe (params.yaml `train`: the ViT-Ti stand-in checkpoint at 32 px, its epochs,
lr, layer decay, label smoothing and augmentation) on scikit-learn's digits, once per seed with the training
augmentation in batches on the device (`augment_on: device`, the new pipeline) and once per image in the
loader (`augment_on: loader`: timm's PIL transforms, the pipeline before), and measures top-1 on held-out
images. The distillation teacher is left out: both pipelines would hand it the same images. Data: the odd
half of the 1797 digits is the test set; of the even half, every tenth image validates (best epoch), the rest
trains. Passes, as bench/amp_parity.py, when the two means differ by at most the noise: twice the larger
seed-to-seed standard deviation or twice the sampling error of the difference, whichever is larger. Each mean
is printed with its 95 % interval (binomial, over all test predictions of its seeds).

Needs torch, torchvision, timm, numpy, Pillow, safetensors, pyyaml, pydantic and scikit-learn only. Exit 0
passed, 1 not, 2 no CUDA for --device cuda.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("loader", "device")


def split_digits(root: Path) -> dict[str, tuple[list[str], list[int]]]:
    """The three splits of the digits sample written under `root`, as (paths, labels)."""
    splits: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in ("train", "val", "test")}
    for path in sorted(root.rglob("digit_*.png")):
        index = int(path.stem.split("_")[1])
        split = "test" if index % 2 else ("val" if index % 20 == 0 else "train")
        splits[split][0].append(path.relative_to(root).as_posix())
        splits[split][1].append(int(path.parent.name))
    return splits


def fine_tune(mode: str, seed: int, device: str, epochs: int | None, root: Path, splits: dict, work: Path) -> float:
    """Test top-1 after the quickstart fine-tune with the augmentation on the device or in the loader."""
    import torch

    from vitops.flows.config import load_params
    from vitops.flows.settings import recipe_for
    from vitops.vit.data import AugmentParams, ShardSampler, image_dataset, resolve_meta
    from vitops.vit.distributed import DistInfo
    from vitops.vit.loader import DeviceLoader
    from vitops.vit.sources import create_model
    from vitops.vit.train import TrainConfig, evaluate, fit

    recipe = recipe_for(load_params(ROOT / "params.yaml"))
    source = recipe.source
    if source.startswith("file:") and not Path(source.removeprefix("file:")).is_absolute():
        source = f"file:{ROOT / source.removeprefix('file:')}"
    classes = [str(d) for d in range(10)]
    torch.manual_seed(seed)
    model, arch, kwargs = create_model(source, recipe.model, 10, recipe.img_size, recipe.model_kwargs)
    meta = resolve_meta(model, arch, classes, recipe.img_size, kwargs, crop_pct=recipe.crop_pct)
    augment = AugmentParams(**{**recipe.augment, "augment_on": mode})
    train_set = image_dataset(root, *splits["train"], meta, True, augment)
    val_set = image_dataset(root, *splits["val"], meta, False)
    test_set = image_dataset(root, *splits["test"], meta, False)
    config = {**recipe.config, "seed": seed, "workers": 0}
    if epochs:
        config["epochs"] = epochs
    cfg = TrainConfig(**config)
    dist = DistInfo(device=torch.device(device))
    fit(model, train_set, val_set, cfg, work / f"{mode}-{seed}", num_classes=10, targets=train_set.targets,
        dist=dist, overwrite=True, show_progress=False)  # fmt: skip
    loader = DeviceLoader(test_set, ShardSampler(len(test_set)), 256, dist.device)
    return evaluate(model, loader, dist.device, cfg.amp)["top1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="default: the recipe's (params.yaml train.epochs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    from vitops.data_checks.sample import write_sample

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    from vitops.flows.config import load_params

    img_size = load_params(ROOT / "params.yaml").train.img_size
    top1: dict[str, list[float]] = {mode: [] for mode in MODES}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitops-pipeline-parity-") as tmp:
        root = Path(tmp) / "digits"
        write_sample(root, img_size=img_size)
        splits = split_digits(root)
        for seed in range(args.seeds):
            for mode in MODES:
                top1[mode].append(fine_tune(mode, seed, args.device, args.epochs, root, splits, Path(tmp)))
                print(f"seed {seed}, {mode}: top-1 {top1[mode][-1]:.2%}", flush=True)
        images = len(splits["test"][0])
    spread = max(statistics.pstdev(v) for v in top1.values())
    p = statistics.mean(top1["loader"])
    sampling = math.sqrt(2 * p * (1 - p) / (images * args.seeds))  # s.e. of a difference of two such means
    noise = max(2 * spread, 2 * sampling, 1 / images)
    diff = statistics.mean(top1["device"]) - p
    passed = abs(diff) <= noise
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device}: the quickstart recipe, {args.seeds} seeds, {images} test images, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    intervals = {}
    for mode, values in top1.items():
        mean = statistics.mean(values)
        half = 1.96 * math.sqrt(max(mean * (1 - mean), 1e-12) / (images * args.seeds))
        intervals[mode] = (mean - half, mean + half)
        print(f"  {mode}: top-1 {', '.join(f'{v:.2%}' for v in values)} (mean {mean:.2%}, 95 % interval "
              f"{mean - half:.2%} to {mean + half:.2%})")  # fmt: skip
    print(f"  device - loader: {diff:+.2%} (noise {noise:.2%}): {'PASSED' if passed else 'FAILED'}")
    if args.json:
        doc = {"device": device, "top1": top1, "intervals": intervals, "diff": diff, "noise": noise,
               "passed": passed, "images": images}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
