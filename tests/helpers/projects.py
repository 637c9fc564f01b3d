"""A tiny vitops project for the flow tests (and bench/flow_overhead.py): a git + DVC repository whose data/raw is
an imported data version of 60 digit images, a tiny stand-in checkpoint, and a params.yaml with tiny, fast settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from helpers.vit import TINY_VIT, write_tiny_checkpoint

PRICES = {
    "currency": "USD",
    "train_price_per_hour": 4.0,
    "serve_price_per_hour": 0.2,
    "utilisation": 0.5,
    "retrains_per_month": 4,
    "images_per_month": 2_000_000,
    "upkeep_per_month": 300.0,
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)


def make_project(root: Path, model: str, images: int = 60) -> Path:
    """Write the project under `root` (data imported with `vitops data import`); returns its params.yaml."""
    from vitops.data_checks.sample import write_sample
    from vitops.flows.cli import main

    root.mkdir(parents=True, exist_ok=True)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "test@example.com")
    _git(root, "config", "user.name", "vitops test")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    write_tiny_checkpoint(root / "standin.safetensors")
    a = root / "artifacts"
    params = {
        "data": {"raw_dir": str(root / "data" / "raw"), "remote": str(root.parent / f"{root.name}-remote")},
        "validate": {"manifest": str(a / "manifest.csv"), "report": str(a / "validation" / "report.json"),
                     "min_images_per_class": 3, "workers": 1},
        "train": {"source": f"file:{root / 'standin.safetensors'}", "img_size": 32, **TINY_VIT, "epochs": 1,
                  "batch_size": 16, "warmup_epochs": 0.5, "out_dir": str(a / "train" / "vit"),
                  "teacher": f"file:{a / 'train' / 'baseline' / 'model'}"},
        "baseline": {"epochs": 1, "out_dir": str(a / "train" / "baseline")},
        "evaluate": {"out_dir": str(a / "eval")},
        "export": {"out": str(a / "engines" / "model.onnx"), "parity_images": 16, "exporter": "torchscript"},
        "engine": {"out_dir": str(a / "engines"), "calibration_images": 16, "min_int8_top1_agreement": 0.5},
        "bench": {"warmup": 1, "iters": 10, "large_batch": 4, "out": str(a / "bench" / "latency.json")},
        "tracking": {"registered_model": model, "experiment": model},
        "gate": {"report": str(a / "gate" / "report.md"), "min_uplift_points": -100.0, "bootstrap_samples": 200,
                 "max_p95_ms": 1000.0, "max_tco_increase": None},
        "cost": PRICES,
    }  # fmt: skip
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    (root / ".gitignore").write_text("artifacts/\n*.safetensors\nmlflow.db\n", encoding="utf-8")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "project")
    write_sample(root.parent / f"{root.name}-src", size=images)
    assert main(["--params", str(path), "data", "import", str(root.parent / f"{root.name}-src")]) == 0
    return path


def set_params(path: Path, **sections: dict) -> Path:
    """Update sections of a params.yaml in place."""
    raw = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path
