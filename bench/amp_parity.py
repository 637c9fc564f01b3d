"""bf16 autocast against FP32: a short fine-tune of the quickstart ViT must reach the same top-1 within noise.

    python bench/amp_parity.py [--device cuda] [--steps 300] [--seeds 3] [--json FILE]

Fine-tunes the quickstart architecture (params.yaml `train`: ViT-Ti, 32 px, patch 8, depth 6) from the stand-in
checkpoint in assets/ on scikit-learn's digits (even half), once per seed in FP32 and once with bf16 autocast,
and measures top-1 on the odd half. Passes when the two means differ by at most the noise: twice the larger
seed-to-seed standard deviation or twice the sampling error of the difference on that many images, whichever
is larger. Exit 0 passed, 1 not, 2 no CUDA for --device cuda.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def fine_tune(device: str, bf16: bool, seed: int, steps: int, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 on the odd half after `steps` AdamW steps on the even half, from the stand-in weights."""
    import torch

    from vitops.flows.config import load_params
    from vitops.vit.sources import create_model

    t = load_params().train
    torch.manual_seed(seed)
    model, _, _ = create_model(
        t.source,
        t.model,
        num_classes=10,
        img_size=t.img_size,
        model_kwargs={"patch_size": t.patch_size, "depth": t.depth},
    )
    model = model.to(device).train()
    xt, yt = torch.from_numpy(x[::2]).to(device), torch.from_numpy(y[::2]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=gen).to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    xo = torch.from_numpy(x[1::2]).to(device)
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        predictions = torch.cat([model(xo[i : i + 256]).argmax(1) for i in range(0, len(xo), 256)])
    return float((predictions.cpu().numpy() == y[1::2]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from latency_targets import digits_images

    from vitops.flows.config import load_params

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    t = load_params().train
    x, y = digits_images(t.img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    top1: dict[str, list[float]] = {"fp32": [], "bf16": []}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for label in top1:
            top1[label].append(fine_tune(args.device, label == "bf16", seed, args.steps, x, y))
    images = len(y[1::2])
    spread = max(statistics.pstdev(v) for v in top1.values())
    p = statistics.mean(top1["fp32"])
    sampling = math.sqrt(2 * p * (1 - p) / (images * args.seeds))  # s.e. of a difference of two such means
    noise = max(2 * spread, 2 * sampling, 1 / images)
    diff = statistics.mean(top1["bf16"]) - statistics.mean(top1["fp32"])
    passed = abs(diff) <= noise
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{device}: {args.steps} steps x {args.seeds} seeds, {time.perf_counter() - start:.0f} s")
    for label, values in top1.items():
        print(f"  {label}: top-1 {', '.join(f'{v:.2%}' for v in values)} (mean {statistics.mean(values):.2%})")
    print(f"  bf16 - fp32: {diff:+.2%} (noise {noise:.2%}): {'PASSED' if passed else 'FAILED'}")
    if args.json:
        doc = {"device": device, "top1": top1, "diff": diff, "noise": noise, "passed": passed, "images": images}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
