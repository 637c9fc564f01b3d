"""The GPU's ceiling for ViT training and inference, with synthetic data already on the GPU: the reference that the
other GPU figures of a `bench/gpu.sh` run are fractions of (same run, same GPU, same torch).

    python bench/gpu_ceiling.py --json OUT.json [--parts training,inference] [--arch vit_base_patch16_224]
        [--batch 256] [--budget-s 125]

- training: bf16 autocast, fused AdamW, a batch of random images and labels on the GPU, eager and then
  torch.compile; img/s over `--steps` steps after warm-up, and MFU: training FLOPs per image (torch's FLOP counter,
  forward and backward) x img/s over the GPU's dense bf16 peak (989 TFLOP/s for an H100/H200 SXM; `--peak-tflops`);
- inference: FP16 autocast, batch 1 and `--batch`, eager and then torch.compile (`reduce-overhead`: CUDA graphs);
  p50 ms and img/s.

Phases run eager first, then compiled training, then compiled inference at each batch size, each compiled one
only if the time left in `--budget-s` covers its compile (up to a minute for ViT-B/16). The JSON is rewritten after
every phase, so a phase left out (named in `skipped`) or a step killed by its time limit leaves the others. Exit 0
(the figures are a reference, there is nothing to pass), 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
COMPILE_S = {"train": 75.0, "inference": 25.0}  # what a compile of ViT-B/16 may take; a phase needs this much left


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per mode")
    p.add_argument("--iters", type=int, default=100, help="timed batch-1 inference calls per mode")
    p.add_argument("--budget-s", type=float, default=125.0, help="skip compiled phases that would not fit")
    p.add_argument(
        "--parts",
        default="training,inference",
        help="training and/or inference (bench/gpu.sh: inference only, as "
        "bench/train_throughput.py measures the training ceiling in its own run)",
    )
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: by GPU name)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of this script")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train_rate(model, batch: int, steps: int, size: int, device: str = "cuda") -> float:
    """img/s of bf16 training steps with fused AdamW on random data on the GPU, after 3 warm-up steps."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn((batch, 3, size, size), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def inference_p50(model, batch: int, iters: int, size: int, device: str = "cuda") -> float:
    """p50 ms of FP16-autocast inference calls on random data on the GPU, after 10 warm-up calls."""
    import torch

    x = torch.randn((batch, 3, size, size), device=device)

    def call() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
            model(x)
        _sync(device)

    for _ in range(10):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import timm
    import torch

    from vitops.deploy.roofline import model_flops

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device; none found", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((p for k, p in PEAK_BF16.items() if k in gpu), None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(args.arch, pretrained=False).to(dev)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    flops = model_flops(model, torch.randn((4, 3, size, size), device=dev), backward=True)
    doc: dict = {"gpu": gpu, "torch": torch.__version__, "arch": args.arch, "batch": args.batch,
                 "train_gflop_per_image": flops / 1e9, "peak_bf16_tflops": (peak or 0) / 1e12,
                 "training": [], "inference": [], "skipped": []}  # fmt: skip

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))

    def fits(phase: str, batch: int | None = None) -> bool:
        left = deadline - time.monotonic()
        if left >= COMPILE_S[phase]:
            return True
        phase = f"{phase} batch {batch}" if batch else phase
        doc["skipped"].append(
            f"{phase} compiled: {left:.0f} s left of --budget-s, a compile takes ~{COMPILE_S[phase]:g}"
        )
        save()
        return False

    def train(mode: str, net) -> None:
        start = time.monotonic()
        rate = train_rate(net.train(), args.batch, args.steps, size, dev)
        mfu = rate * flops / peak if peak else None
        doc["training"].append({"mode": mode, "img_per_s": rate, "mfu": mfu, "wall_s": time.monotonic() - start})
        print(f"training {mode}: {rate:,.0f} img/s" + (f", MFU {mfu:.1%}" if mfu else ""), flush=True)
        save()

    def infer(mode: str, net) -> None:
        for batch in (1, args.batch):
            if mode == "compiled" and not fits("inference", batch):  # each batch size is a compile of its own
                continue
            start = time.monotonic()
            iters = args.iters if batch == 1 else max(5, args.iters // 10)
            p50 = inference_p50(net.eval(), batch, iters, size, dev)
            row = {"mode": mode, "batch": batch, "p50_ms": p50, "img_per_s": batch / (p50 / 1e3),
                   "wall_s": time.monotonic() - start}  # fmt: skip
            doc["inference"].append(row)
            print(f"inference {mode} batch {batch}: p50 {p50:.3f} ms, {row['img_per_s']:,.0f} img/s", flush=True)
            save()

    print(f"{args.arch} on {gpu}, torch {torch.__version__}; synthetic data on the GPU", flush=True)
    parts = set(args.parts.split(","))
    if "training" in parts:
        train("eager", model)
    if "inference" in parts:
        infer("eager", model)
    if "training" in parts and fits("train"):
        train("compiled", torch.compile(model))
        torch.compiler.reset()  # the training graphs are not the inference ones
    if "inference" in parts:
        infer("compiled", torch.compile(model, mode="reduce-overhead" if dev == "cuda" else None, dynamic=False))
    eager = {r["batch"]: r["p50_ms"] for r in doc["inference"] if r["mode"] == "eager"}
    for r in doc["inference"]:
        r["x_eager"] = r["p50_ms"] / eager[r["batch"]]
    rates = {r["mode"]: r["img_per_s"] for r in doc["training"]}
    if "compiled" in rates:
        doc["train_compiled_x_eager"] = rates["compiled"] / rates["eager"]
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
