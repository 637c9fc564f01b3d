"""Training throughput (images/s) in one run: the synthetic ceiling, vitops' input pipeline, and timm's train.py.

Rows, all on the same model, batch size, precision and PNG folder (scikit-learn's digits written at the input
size, cycled up to --train-images), each the median of --repeats runs:

- `ceiling`: synthetic data already on the device, eager and torch.compile: the recipe's step (fused AdamW
  with layer decay, label-smoothed cross-entropy, bf16 autocast on CUDA) and nothing else; what the device does
  when nothing waits for data.
- `vitops, device`: `vit.train.fit` on the folder through the input pipeline: each image decoded once,
  augmented in batches on the device; eager (mode `device`) or with the step compiled (`device-compile`, as
  `train.compile: true`).
- `vitops, loader`: the same, eager, with `augment_on: loader`: timm's per-image transforms in the loader, the
  pipeline vitops had before (now reading decoded images; before, cached PIL images), as the quickstart ran it.
- `timm train.py`: with `--timm-repo` (a pytorch-image-models checkout, not in timm's wheel): the same model,
  data, batch, optimizer, schedule and augmentation, `-j --workers` loader processes, no --torchcompile.

A vitops or timm rate is the train phase of an epoch (validation excluded), averaged over the epochs after the
first (decode, compile and warm-up); a ceiling rate is --steps timed steps after warm-up. On CUDA the table adds
MFU: training FLOPs per image (torch's FlopCounterMode, forward and backward) times img/s over the GPU's dense
bf16 peak. Each row is set against both ceilings; the issue-21 targets are checked at the end. Default rows:
on the CPU ceiling,loader,device (the quickstart recipe is eager); on CUDA ceiling,device-compile,timm.

It needs torch, torchvision, timm, numpy, Pillow, safetensors, pyyaml, pydantic and scikit-learn, nothing of
MLflow, Prefect, Great Expectations or DVC, so it runs on a bare GPU machine with the project on PYTHONPATH:

    python bench/train_throughput.py                                     # CPU: the quickstart, loader vs device
    python bench/train_throughput.py --preset vit-b16 --device cuda --timm-repo /abs/pytorch-image-models
    python bench/train_throughput.py --preset tiny --epochs 2 --train-images 64 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    # The offline quickstart's model: ViT-Tiny width, 6 blocks, 8-pixel patches on 32-pixel images.
    "quickstart": dict(model="vit_tiny_patch16_224", img_size=32, kwargs={"patch_size": 8, "depth": 6}, batch_size=64),
    "tiny": dict(
        model="vit_tiny_patch16_224",
        img_size=32,
        kwargs={"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        batch_size=16,
    ),
    "vit-s16": dict(model="vit_small_patch16_224", img_size=224, kwargs={}, batch_size=256),
    "vit-b16": dict(model="vit_base_patch16_224", img_size=224, kwargs={}, batch_size=256),
}
# Dense bf16 tensor-core peaks (FLOP/s) by GPU name fragment; --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
TARGETS = {"img_per_s": 2800.0, "vs_ceiling": 0.8, "vs_timm": 2.0, "cpu_device_vs_loader": 1.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--timm-repo", type=Path, help="pytorch-image-models checkout (absolute path): adds timm's row")
    p.add_argument("--modes", help="rows, of ceiling,loader,device,device-compile,timm (default: see above)")
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--epochs", type=int, default=4, help="epochs per trainer; the first is warm-up")
    p.add_argument("--train-images", type=int, help="training images (default: 1280 on the CPU, 2560 on CUDA)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each ceiling, after 5 warm-up steps")
    p.add_argument("--repeats", type=int, default=1, help="runs per row, alternating; the median is reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads")
    p.add_argument("--workers", type=int, help="loader processes (default: 0 on the CPU, 8 on CUDA)")
    p.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak in TFLOP/s (default: by GPU name)")
    p.add_argument("--work-dir", type=Path, help="keep data, caches and outputs here (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    return p.parse_args(argv)


def write_data(root: Path, img_size: int, train_images: int, val_images: int = 256) -> None:
    """A pre-split ImageFolder: `train_images` training digits (the 1797 cycled when more are asked), `val_images`
    validation digits."""
    from vitops.data_checks.sample import write_sample

    raw = root.parent / "raw"
    files = sorted(write_sample(raw, img_size=img_size))
    random.Random(0).shuffle(files)  # every class in every split
    val, train = files[:val_images], files[val_images:]
    for split, chosen in (("train", [train[i % len(train)] for i in range(train_images)]), ("val", val)):
        for i, path in enumerate(chosen):
            dest = root / split / path.parent.name / f"{i:06d}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def _listing(folder: Path) -> tuple[list[str], list[int]]:
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    return paths, [int(p.split("/")[0]) for p in paths]


def _recipe():
    from vitops.flows.config import load_params
    from vitops.flows.settings import recipe_for

    return recipe_for(load_params(ROOT / "params.yaml"))


def _model(cfg: dict):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(cfg["model"], num_classes=10, img_size=cfg["img_size"], **cfg["kwargs"])


def _release() -> None:
    """Free what the last row left (its model, compiled graphs, cached GPU memory) before the next."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ceiling(cfg: dict, args: argparse.Namespace, compiled: bool) -> float:
    """img/s of the recipe's step on one synthetic batch already on the device."""
    import torch
    from timm.optim import create_optimizer_v2

    recipe = _recipe().config
    device = torch.device(args.device)
    model = _model(cfg).to(device).train()
    opt = create_optimizer_v2(
        model, opt="adamw", lr=recipe["lr"], weight_decay=recipe["weight_decay"], layer_decay=recipe["layer_decay"],
        fused=True,
    )  # fmt: skip
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    forward = torch.compile(model) if compiled else model
    b, s = cfg["batch_size"], cfg["img_size"]
    x = torch.randn(b, 3, s, s, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return b * args.steps / (time.perf_counter() - start)


def run_vitops(work: Path, cfg: dict, args: argparse.Namespace, mode: str, compiled: bool = False) -> float:
    """img/s of `vit.train.fit` on the PNG folder, the augmentation on the device or in the loader (`mode`)."""
    import torch

    from vitops.vit.data import AugmentParams, image_dataset, resolve_meta
    from vitops.vit.distributed import DistInfo
    from vitops.vit.train import TrainConfig, fit

    recipe = _recipe()
    model = _model(cfg)
    meta = resolve_meta(model, cfg["model"], [str(d) for d in range(10)], cfg["img_size"], cfg["kwargs"], crop_pct=1.0)
    augment = AugmentParams(**{**recipe.augment, "augment_on": mode})
    data = work / "data"
    cache = work / "decoded"
    train_paths, train_targets = _listing(data / "train")
    val_paths, val_targets = _listing(data / "val")
    train_set = image_dataset(data / "train", train_paths, train_targets, meta, True, augment, cache_dir=cache)
    val_set = image_dataset(data / "val", val_paths, val_targets, meta, False, cache_dir=cache)
    config = {**recipe.config, "epochs": args.epochs, "batch_size": cfg["batch_size"], "workers": cfg["workers"]}
    config.update(patience=0, amp="bf16" if args.device == "cuda" else "off", compile=compiled)
    result = fit(
        model,
        train_set,
        val_set,
        TrainConfig(**config),
        work / f"vitops-{mode}",
        num_classes=10,
        targets=train_set.targets,
        dist=DistInfo(device=torch.device(args.device)),
        overwrite=True,
        show_progress=False,
    )
    return _mean_after_warmup([h["train_img_per_s"] for h in result.history])


def run_timm(work: Path, cfg: dict, args: argparse.Namespace) -> float:
    """timm's train.py with the same recipe; returns the rate it logs for the train phase."""
    script = args.timm_repo / "train.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --timm-repo must be a pytorch-image-models checkout")
    recipe = _recipe()
    r, a = recipe.config, recipe.augment
    # train.py sizes the data from --img-size but builds the model from --model-kwargs only.
    kwargs = [f"img_size={cfg['img_size']}"] + [f"{k}={v}" for k, v in cfg["kwargs"].items()]
    cmd = [
        sys.executable, str(script), "--data-dir", str(work / "data"), "--train-split", "train", "--val-split", "val",
        "--model", cfg["model"], "--num-classes", "10", "--img-size", str(cfg["img_size"]),
        "-b", str(cfg["batch_size"]), "--opt", "adamw", "--lr", str(r["lr"]), "--weight-decay", str(r["weight_decay"]),
        "--layer-decay", str(r["layer_decay"]), "--sched", "cosine", "--warmup-epochs", "1", "--warmup-lr",
        str(r["warmup_lr"]), "--min-lr", str(r["min_lr"]), "--epochs", str(args.epochs), "--smoothing",
        str(r["label_smoothing"]), "--scale", str(a["scale_min"]), "1.0", "--hflip", str(a["hflip"]),
        "--color-jitter", str(a["color_jitter"]), "--crop-pct", "1.0", "-j", str(max(1, cfg["workers"])),
        "--device", args.device, "--output", str(work / "timm-out"), "--log-interval", "1000",
        "--checkpoint-hist", "1", "--seed", "0",
    ]  # fmt: skip
    cmd += ["--model-kwargs", *kwargs]
    if args.device == "cuda":
        cmd += ["--amp", "--amp-dtype", "bfloat16", "--pin-mem"]
    else:
        cmd += ["--no-prefetcher"]
    env = _env(args)
    env["PYTHONPATH"] = f"{args.timm_repo}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"timm train.py failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    # Last line of each epoch: "Train: E [ N/N (100%)] ... Time: t, r/s  (avg_t, avg_r/s)"
    pattern = re.compile(r"Train: (\d+) \[\s*\d+/\d+ \(100%\)\].*?\(\s*([\d.]+)s,\s*([\d.]+)/s\)")
    found = list(pattern.finditer(out.stdout + out.stderr))
    if not found:
        raise SystemExit(f"could not read timm's throughput from its log:\n{(out.stdout + out.stderr)[-3000:]}")
    return _mean_after_warmup([cfg["batch_size"] / float(m.group(2)) for m in found])


def _env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _mean_after_warmup(rates: list[float]) -> float:
    steady = rates[1:] or rates
    return sum(steady) / len(steady)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(cfg: dict, device: str) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode (attention included)."""
    import torch

    from vitops.deploy.roofline import model_flops

    model = _model(cfg).to(device)
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"], device=device)
    return model_flops(model, x, backward=True)


def check_torchvision() -> str | None:
    """None when torchvision imports beside this torch; else what to bring."""
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # missing, or built for another torch
        import torch

        return (
            f"torchvision does not import here ({err}); timm and vitops' input pipeline need it. Bring the "
            f"torchvision wheel built for torch {torch.__version__} (e.g. 0.26 for torch 2.11) and install it with "
            "pip install --no-deps"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_torchvision()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.timm_repo:
        args.timm_repo = args.timm_repo.expanduser().resolve()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    cfg = dict(PRESETS[args.preset])
    cfg["batch_size"] = args.batch_size or cfg["batch_size"]
    cfg["workers"] = args.workers if args.workers is not None else (8 if cuda else 0)
    modes = (args.modes or ("ceiling,device-compile,timm" if cuda else "ceiling,loader,device,timm")).split(",")
    if not args.timm_repo:
        modes = [m for m in modes if m != "timm"]
    train_images = args.train_images or (2560 if cuda else 1280)
    train_images = max(cfg["batch_size"], train_images - train_images % cfg["batch_size"])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vitops-train-bench-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        write_data(work / "data", cfg["img_size"], train_images)
    os.environ.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1")

    runs: dict[str, list[float]] = {}
    start = time.perf_counter()
    rows = []
    if "ceiling" in modes:
        rows += [("ceiling, eager", lambda: run_ceiling(cfg, args, compiled=False))]
        rows += [("ceiling, torch.compile", lambda: run_ceiling(cfg, args, compiled=True))]
    if "loader" in modes:
        rows += [("vitops, loader (eager)", lambda: run_vitops(work, cfg, args, "loader"))]
    if "device" in modes:
        rows += [("vitops, device (eager)", lambda: run_vitops(work, cfg, args, "device"))]
    if "device-compile" in modes:
        rows += [("vitops, device (torch.compile)", lambda: run_vitops(work, cfg, args, "device", compiled=True))]
    if "timm" in modes:
        rows += [("timm train.py", lambda: run_timm(work, cfg, args))]
    for _ in range(args.repeats):  # alternate, so that drifting load hits every row alike
        for label, run in rows:
            runs.setdefault(label, []).append(run())
            _release()
    rates = {label: statistics.median(values) for label, values in runs.items()}

    device = torch.cuda.get_device_name() if cuda else f"CPU ({args.threads} threads)"
    mfu: dict[str, float] = {}
    if cuda:
        peak = (
            args.peak_tflops * 1e12
            if args.peak_tflops
            else next((p for key, p in PEAK_BF16.items() if key in device), None)
        )
        if peak:
            flops = flops_per_image(cfg, "cuda")
            mfu = {label: rate * flops / peak for label, rate in rates.items()}
    ceilings = {"eager": rates.get("ceiling, eager"), "compiled": rates.get("ceiling, torch.compile")}
    shape = f"{cfg['model']} {cfg['img_size']} px" + "".join(f" {k} {v}" for k, v in cfg["kwargs"].items())
    print(f"\nTraining throughput on {device}: {shape}, batch {cfg['batch_size']}, {'bf16' if cuda else 'fp32'}, "
          f"{train_images} train images, {args.epochs} epochs (first excluded), {cfg['workers']} loader workers, "
          f"median of {args.repeats} run(s), {time.perf_counter() - start:.0f} s in all")  # fmt: skip
    print(f"| row | img/s | x eager ceiling | x compiled ceiling |{' MFU |' if mfu else ''} runs |")
    print(f"| --- | --- | --- | --- |{' --- |' if mfu else ''} --- |")
    for label, rate in rates.items():
        vs = " | ".join(f"{rate / c:.2f}x" if c else "-" for c in ceilings.values())
        extra = f" {mfu[label]:.1%} |" if mfu else ""
        print(f"| {label} | {rate:,.1f} | {vs} |{extra} {', '.join(f'{r:,.1f}' for r in runs[label])} |")

    eager, compiled = rates.get("vitops, device (eager)"), rates.get("vitops, device (torch.compile)")
    ours = compiled or eager  # the fastest configuration this run measured
    ratios = {}
    if ours and "timm train.py" in rates:
        ratios["vitops_vs_timm"] = ours / rates["timm train.py"]
    if eager and "vitops, loader (eager)" in rates:
        ratios["device_vs_loader"] = eager / rates["vitops, loader (eager)"]
    ceiling = ceilings["compiled" if compiled else "eager"]
    if ours and ceiling:
        ratios["vitops_vs_ceiling"] = ours / ceiling  # against the ceiling of the same mode, eager or compiled
    for key, value in ratios.items():
        print(f"{key.replace('_', ' ')}: {value:.2f}x")
    targets = check_targets(args, ours, ratios)
    for line in targets:
        print(line)
    if args.json:
        doc = {"device": device, "preset": args.preset, "config": cfg, "train_images": train_images,
               "epochs": args.epochs, "rows": {k: {"img_per_s": v, "runs": runs[k], "mfu": mfu.get(k)}
                                               for k, v in rates.items()},
               "ratios": ratios, "targets": targets}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


def check_targets(args: argparse.Namespace, ours: float | None, ratios: dict[str, float]) -> list[str]:
    """The issue-21 targets this run can decide, each with PASS or MISS."""
    lines = []

    def verdict(name: str, value: float | None, target: float, unit: str = "x") -> None:
        if value is not None:
            ok = "PASS" if value >= target else "MISS"
            lines.append(f"target {name}: {value:,.2f}{unit} (>= {target:,}{unit}): {ok}")

    if args.device == "cuda" and args.preset == "vit-b16":
        verdict("vitops img/s", ours, TARGETS["img_per_s"], " img/s")
        verdict("vitops / compiled ceiling", ratios.get("vitops_vs_ceiling"), TARGETS["vs_ceiling"])
        verdict("vitops / timm train.py", ratios.get("vitops_vs_timm"), TARGETS["vs_timm"])
    if args.device == "cpu" and args.preset == "quickstart":
        verdict("CPU device / loader (today)", ratios.get("device_vs_loader"), TARGETS["cpu_device_vs_loader"])
    return lines


if __name__ == "__main__":
    sys.exit(main())
