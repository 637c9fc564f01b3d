"""Training throughput (images/s) of `vitops train` against timm's own train.py, same model, data and threads.

Both trainers run as subprocesses on the same pre-split ImageFolder (scikit-learn's digits, written at the
model's input size), with the same model, batch size, optimizer (AdamW + layer decay), schedule, label
smoothing, augmentation settings, data-loading workers and thread count. Throughput is each trainer's own
training-loop rate (images per second of the train phase, validation excluded), averaged over the epochs
after the first. On CUDA the table adds model FLOPs utilisation: achieved training FLOP/s (forward +
backward FLOPs per image counted by torch's FlopCounterMode) over the GPU's dense bf16 peak.

timm's train.py is not in its wheel; pass a checkout:

    python bench/train_throughput.py --timm-repo /path/to/pytorch-image-models            # CPU, ViT-Tiny 32px
    python bench/train_throughput.py --timm-repo ... --preset vit-s16 --device cuda       # ViT-S/16 224 bf16
    python bench/train_throughput.py --timm-repo ... --preset vit-b16 --device cuda       # ViT-B/16 224 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESETS = {
    # The offline quickstart's model: ViT-Tiny width, 6 blocks, 8-pixel patches on 32-pixel images.
    "quickstart": dict(model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6, batch_size=64),
    "vit-s16": dict(model="vit_small_patch16_224", img_size=224, patch_size=None, depth=None, batch_size=256),
    "vit-b16": dict(model="vit_base_patch16_224", img_size=224, patch_size=None, depth=None, batch_size=256),
}
# Dense bf16 tensor-core peaks (FLOP/s) by GPU name fragment; --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-repo", type=Path, required=True, help="checkout of huggingface/pytorch-image-models")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trainer; the first is warm-up")
    p.add_argument("--train-images", type=int, default=1280, help="training images (a multiple of the batch size)")
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer, alternating; the median is reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads of each trainer")
    p.add_argument(
        "--workers", type=int, default=None, help="loader workers (default: 1 on CPU, 8 on CUDA; timm needs >= 1)"
    )
    p.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak in TFLOP/s (default: by GPU name)")
    p.add_argument("--work-dir", type=Path, help="keep data and outputs here (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    return p.parse_args()


def write_data(root: Path, img_size: int, train_images: int) -> int:
    """A pre-split ImageFolder: `train_images` training digits, the rest split between val and test."""
    from vitops.data_checks.sample import write_sample

    raw = root.parent / "raw"
    files = sorted(write_sample(raw, img_size=img_size))
    random.Random(0).shuffle(files)  # every class in every split
    if train_images >= len(files):
        raise SystemExit(f"--train-images must be below {len(files)}")
    for i, path in enumerate(files):
        split = "train" if i < train_images else ("val" if i % 2 else "test")
        dest = root / split / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return len(list((root / "val").rglob("*.png")))


def run_vitops(work: Path, data: Path, cfg: dict, args: argparse.Namespace, env: dict) -> float:
    """`vitops train` (the real command) from a random 'pretrained' file; returns its training img/s."""
    import timm
    import torch
    import yaml
    from safetensors.torch import save_file

    from vitops.data_checks.manifest import scan_dataset, write_manifest

    kwargs = {k: cfg[k] for k in ("patch_size", "depth") if cfg[k]}
    model = timm.create_model(cfg["model"], num_classes=10, img_size=cfg["img_size"], **kwargs)
    weights = work / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    manifest = write_manifest(scan_dataset(data, {"train": 0.8, "val": 0.1, "test": 0.1}), work / "manifest.csv")
    params = {
        "data": {"raw_dir": str(data)},
        "validate": {"manifest": str(manifest), "report": str(work / "none.json")},
        "train": {
            "model": cfg["model"],
            "source": f"file:{weights}",
            "img_size": cfg["img_size"],
            "patch_size": cfg["patch_size"],
            "depth": cfg["depth"],
            "epochs": args.epochs,
            "batch_size": cfg["batch_size"],
            "workers": cfg["workers"],
            "patience": 0,
            "amp": "bf16" if args.device == "cuda" else "off",
            "out_dir": str(work / "vitops-out"),
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    cmd = [sys.executable, "-m", "vitops", "--params", str(work / "params.yaml"), "train", "--no-tracking"]
    subprocess.run([*cmd, "--overwrite", "--device", args.device], check=True, env=env, cwd=work)
    ckpt = torch.load(work / "vitops-out" / "checkpoints" / "last.pt", weights_only=True)
    rates = [h["train_img_per_s"] for h in ckpt["state"]["history"]]
    return _mean_after_warmup(rates)


def run_timm(work: Path, data: Path, cfg: dict, args: argparse.Namespace, env: dict) -> float:
    """timm's train.py with the same recipe; returns the rate it logs for the train phase."""
    script = args.timm_repo / "train.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --timm-repo must be a pytorch-image-models checkout")
    # train.py sizes the data from --img-size but builds the model from --model-kwargs only.
    kwargs = [f"img_size={cfg['img_size']}"] + [f"{k}={cfg[k]}" for k in ("patch_size", "depth") if cfg[k]]
    cmd = [
        sys.executable, str(script), "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
        "--model", cfg["model"], "--num-classes", "10", "--img-size", str(cfg["img_size"]),
        "-b", str(cfg["batch_size"]), "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
        "--layer-decay", "0.75", "--sched", "cosine", "--warmup-epochs", "1", "--warmup-lr", "1e-6",
        "--min-lr", "1e-6", "--epochs", str(args.epochs), "--smoothing", "0.1", "--scale", "0.6", "1.0",
        "--hflip", "0", "--color-jitter", "0", "--crop-pct", "1.0", "--mean", "0.5", "0.5", "0.5",
        "--std", "0.5", "0.5", "0.5", "-j", str(cfg["workers"]), "--device", args.device,
        "--output", str(work / "timm-out"), "--log-interval", "1000", "--checkpoint-hist", "1", "--seed", "0",
    ]  # fmt: skip
    cmd += ["--model-kwargs", *kwargs]
    if args.device == "cuda":
        cmd += ["--amp", "--amp-dtype", "bfloat16", "--pin-mem"]
    else:
        cmd += ["--no-prefetcher"]
    env = {**env, "PYTHONPATH": f"{args.timm_repo}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"timm train.py failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    # Last line of each epoch: "Train: E [ N/N (100%)] ... Time: t, r/s  (avg_t, avg_r/s)"
    pattern = re.compile(r"Train: (\d+) \[\s*\d+/\d+ \(100%\)\].*?\(\s*([\d.]+)s,\s*([\d.]+)/s\)")
    found = [m for m in pattern.finditer(out.stdout + out.stderr)]
    if not found:
        raise SystemExit(f"could not read timm's throughput from its log:\n{(out.stdout + out.stderr)[-3000:]}")
    return _mean_after_warmup([cfg["batch_size"] / float(m.group(2)) for m in found])


def _mean_after_warmup(rates: list[float]) -> float:
    steady = rates[1:] or rates
    return sum(steady) / len(steady)


def flops_per_image(cfg: dict, device: str) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode (attention included)."""
    import timm
    import torch

    from vitops.deploy.roofline import model_flops

    kwargs = {k: cfg[k] for k in ("patch_size", "depth") if cfg[k]}
    model = timm.create_model(cfg["model"], num_classes=10, img_size=cfg["img_size"], **kwargs).to(device)
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"], device=device)
    return model_flops(model, x, backward=True)


def gpu_peak(args: argparse.Namespace) -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return name, args.peak_tflops * 1e12
    return name, next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def main() -> int:
    args = parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    cfg["workers"] = args.workers if args.workers is not None else (8 if args.device == "cuda" else 1)
    train_images = args.train_images - args.train_images % cfg["batch_size"] or cfg["batch_size"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vitops-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        write_data(data, cfg["img_size"], train_images)
    # Alternate the trainers so that drifting machine load hits both alike; report each one's median.
    timm_runs, our_runs = [], []
    for _ in range(args.repeats):
        timm_runs.append(run_timm(work, data, cfg, args, env))
        our_runs.append(run_vitops(work, data, cfg, args, env))
    timm_rate, ours = statistics.median(timm_runs), statistics.median(our_runs)
    print(f"runs (img/s): timm {[round(r, 1) for r in timm_runs]}, vitops {[round(r, 1) for r in our_runs]}")
    rows = [("timm train.py", timm_rate), ("vitops train", ours)]
    device = "CPU" if args.device == "cpu" else None
    mfu: dict[str, float] = {}
    if args.device == "cuda":
        name, peak = gpu_peak(args)
        device = name
        flops = flops_per_image(cfg, "cuda")
        if peak:
            mfu = {label: rate * flops / peak for label, rate in rows}
    shape = f"{cfg['model']} img {cfg['img_size']}" + (
        f" patch {cfg['patch_size']} depth {cfg['depth']}" if cfg["depth"] else ""
    )
    print(f"\nTraining throughput on {device}: {shape}, batch {cfg['batch_size']}, {args.threads} threads, "
          f"{cfg['workers']} workers, {train_images} train images, {args.epochs} epochs (first excluded), "
          f"median of {args.repeats} runs")  # fmt: skip
    print(f"| trainer        | img/s   | vs timm |{' MFU    |' if mfu else ''}")
    print(f"|----------------|---------|---------|{'--------|' if mfu else ''}")
    for label, rate in rows:
        extra = f" {mfu[label]:6.1%} |" if mfu else ""
        print(f"| {label:<14} | {rate:7.1f} | {rate / timm_rate:6.2f}x |{extra}")
    if args.json:
        result = {"device": device, "preset": args.preset, "config": cfg, "threads": args.threads}
        result.update({"timm_img_per_s": timm_rate, "vitops_img_per_s": ours, "ratio": ours / timm_rate})
        result.update({f"mfu_{k.split()[0]}": v for k, v in mfu.items()})
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
