"""`vitops` commands of the train stage: the offline stand-in checkpoint, fine-tuning, the CNN baseline, evaluation.

vitops pretrain-standin [--out FILE] [--images N] [--epochs N]
        offline quickstart only: pretrain the stand-in "external" ViT checkpoint on rendered characters
vitops train [--baseline] [--source SRC] [--resume | --overwrite] [--epochs N] [--out-dir DIR] [--data DIR]
             [--device cpu|cuda] [--no-tracking]
        fine-tune the ViT from `train.source` (or train the CNN baseline) on the validated data; writes
        OUT_DIR/model (weights.safetensors + model.json), OUT_DIR/checkpoints and OUT_DIR/train_metrics.json.
        Multi-GPU / multi-node: `torchrun --nproc_per_node N -m flows.cli train ...`
vitops evaluate [MODEL_DIR] [--baseline] [--out DIR] [--data DIR] [--no-tracking]
        held-out test split: OUT/metrics.json (flat keys, DVC metrics), confusion_matrix.png, reliability.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from flows.config import Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from flows.tracking import TrackingError
    from vit.bundle import BundleError
    from vit.checkpoint import CheckpointError
    from vit.data import DataError
    from vit.distill import DistillError
    from vit.sources import SourceError

    return (SourceError, DataError, CheckpointError, BundleError, TrackingError, DistillError)


log = logging.getLogger(__name__)

# Small fine-tuning sets are decoded once and kept in memory; larger ones are decoded every epoch.
_CACHE_BYTES = 4 * 2**30


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser(
        "pretrain-standin",
        help="offline quickstart only: build the stand-in 'external' ViT checkpoint from rendered characters",
    )
    p.add_argument("--out", type=Path, help="safetensors file to write (default: pretrain.out)")
    p.add_argument("--images", type=int, help="generated training images (default: pretrain.images)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: pretrain.epochs)")
    p.set_defaults(handler=cmd_pretrain_standin)

    p = sub.add_parser("train", help="fine-tune the ViT (or train the CNN baseline) on the validated data")
    p.add_argument("--baseline", action="store_true", help="train the CNN baseline (params `baseline`) instead")
    p.add_argument("--source", help="model source: hf-hub:timm/<model>, timm:<name>.<tag>, file:<path>, mlflow:...")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/last.pt")
    mode.add_argument("--overwrite", action="store_true", help="start afresh, replacing an earlier run's checkpoints")
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--out-dir", type=Path, help="output folder (default: train.out_dir or baseline.out_dir)")
    p.add_argument("--data", type=Path, help="dataset root the manifest paths are relative to (default: data.raw_dir)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model on the held-out test split")
    p.add_argument("model_dir", type=Path, nargs="?", help="model folder (default: <train.out_dir>/model)")
    p.add_argument("--baseline", action="store_true", help="default to the baseline's model folder")
    p.add_argument("--out", type=Path, help="output folder (default: evaluate.out_dir/<vit|baseline>)")
    p.add_argument("--data", type=Path, help="dataset root (default: data.raw_dir)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(handler=cmd_evaluate)


def cmd_pretrain_standin(args: argparse.Namespace, params: Params) -> int:
    """Pretrain the stand-in checkpoint (offline quickstart)."""
    from vit.standin import StandinSpec, pretrain_standin

    p = params.pretrain
    spec = StandinSpec(
        model=p.model,
        img_size=p.img_size,
        patch_size=p.patch_size,
        depth=p.depth,
        images=args.images or p.images,
        epochs=args.epochs or p.epochs,
        batch_size=p.batch_size,
        lr=p.lr,
        seed=p.seed,
    )
    out = args.out or p.out
    info = pretrain_standin(spec, out)
    print(f"wrote {out} (stand-in, NOT public weights; character val top-1 {info['val_top1']:.3f})")
    return 0


def _same_named(cls: type, section: Any) -> dict[str, Any]:
    """The values of `section` (a params.yaml section) for the fields of dataclass `cls` that share their names."""
    names = type(section).model_fields
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if f.name in names}


def _recipe(params: Params, baseline: bool) -> dict[str, Any]:
    """Model, source and TrainConfig settings of the ViT or the baseline run."""
    from vit.train import TrainConfig

    t = params.train
    recipe = {
        "model": t.model,
        "source": t.source,
        "img_size": t.img_size,
        "model_kwargs": {"patch_size": t.patch_size, "depth": t.depth, "drop_path_rate": t.drop_path},
        "out_dir": t.out_dir,
        "teacher": t.teacher,
        "config": _same_named(TrainConfig, t),
    }
    if baseline:
        b = params.baseline
        recipe.update(model=b.model, source=b.source, model_kwargs={}, out_dir=b.out_dir, teacher=None)
        recipe["config"].update(epochs=b.epochs, lr=b.lr, layer_decay=None, weight_decay=b.weight_decay)
    return recipe


def _load_rows(params: Params) -> Any:
    from data_checks.manifest import load_usable

    manifest, report = params.validate_.manifest, params.validate_.report
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"{manifest}: no manifest; run `vitops validate` on the data first")
    return load_usable(Path(manifest), Path(report) if Path(report).is_file() else None)


def _resolve_source(source: str, work: Path) -> str:
    """`mlflow:models:/...` becomes `file:<downloaded folder>`; other sources pass through."""
    if not source.startswith("mlflow:"):
        return source
    from flows.tracking import download_model

    return f"file:{download_model(source.removeprefix('mlflow:'), work)}"


def _teacher(source: str | None, classes: list[str], meta: Any, work: Path) -> tuple[Any, str | None]:
    """The teacher named by `train.teacher` (a vitops model folder or a registered model) and the sha256 of
    its weights, or (None, None) without one."""
    if not source:
        return None, None
    import hashlib

    from vit.bundle import WEIGHTS_FILE
    from vit.distill import DistillError, load_teacher

    resolved = _resolve_source(source, work)
    if not resolved.startswith("file:"):
        raise DistillError(
            f"train.teacher {source!r}: a teacher must be a vitops model folder trained on the same classes "
            "(file:artifacts/train/baseline/model) or a registered model (mlflow:models:/<name>@<alias>)"
        )
    folder = Path(resolved.removeprefix("file:"))
    teacher = load_teacher(folder, classes, meta, source)
    with open(folder / WEIGHTS_FILE, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
    return teacher, sha


def cmd_train(args: argparse.Namespace, params: Params) -> int:
    """Fine-tune (or train the baseline), write the model folder, log to MLflow."""
    import torch

    from flows import tracking
    from vit.data import AugmentParams, class_names, create_dataset, resolve_meta
    from vit.distributed import close_distributed, init_distributed
    from vit.sources import create_model
    from vit.train import TrainConfig, fit

    recipe = _recipe(params, args.baseline)
    if args.source:
        recipe["source"] = args.source
    if args.epochs:
        recipe["config"]["epochs"] = args.epochs
    out_dir = Path(args.out_dir or recipe["out_dir"])
    root = Path(args.data or params.data.raw_dir)
    cfg = TrainConfig(**recipe["config"])
    kind = "baseline" if args.baseline else "vit"

    rows = _load_rows(params)
    classes = class_names(rows, params.data.classes)
    dist = init_distributed(args.device)
    try:
        track = dist.is_main and not args.no_tracking
        if track or any(str(src).startswith("mlflow:") for src in (recipe["source"], recipe["teacher"])):
            tracking.configure(params.tracking.uri, params.tracking.experiment)
        with tempfile.TemporaryDirectory(prefix="vitops-source-") as work:
            source = _resolve_source(recipe["source"], Path(work))
            torch.manual_seed(cfg.seed)  # the new head starts the same in every run and on every rank
            model, arch, kwargs = create_model(
                source, recipe["model"], len(classes), recipe["img_size"], recipe["model_kwargs"], allow_scratch=True
            )
            meta = resolve_meta(model, arch, classes, recipe["img_size"], kwargs, crop_pct=params.train.crop_pct)
            teacher, teacher_sha = _teacher(recipe["teacher"], classes, meta, Path(work) / "teacher")
        if recipe["source"] == "scratch" and not args.baseline:
            log.warning("training the ViT from random weights (source: scratch) as explicitly configured")
        data_version = _data_version(root)
        meta.extra.update(
            source=recipe["source"], kind=kind, data_version=data_version, git_commit=tracking.git_commit()
        )
        if teacher is not None:
            meta.extra.update(teacher=recipe["teacher"], distill=cfg.distill)
        augment = AugmentParams(**_same_named(AugmentParams, params.train))
        cache = _fits_in_memory(rows)
        train_set = create_dataset(root, rows, meta, "train", augment, cache=cache)
        val_set = create_dataset(root, rows, meta, "val", cache=cache)
        fingerprint = {"model": arch, "model_kwargs": kwargs, "classes": classes, "source": recipe["source"]}
        fingerprint["train_images"] = len(train_set)
        if teacher is not None:
            fingerprint["teacher"] = {"source": recipe["teacher"], "weights_sha256": teacher_sha}
        run_params = {
            "kind": kind,
            "model": arch,
            "source": recipe["source"],
            "teacher": recipe["teacher"] or "none",
            "img_size": recipe["img_size"],
            **{f"model.{k}": v for k, v in kwargs.items()},
            **{k: v for k, v in recipe["config"].items()},
            "num_classes": len(classes),
            "train_images": len(train_set),
            "val_images": len(val_set),
            "world_size": dist.world_size,
            "device": str(dist.device),
        }

        def run_fit(on_epoch: Any) -> Any:
            return fit(
                model,
                train_set,
                val_set,
                cfg,
                out_dir / "checkpoints",
                num_classes=len(classes),
                targets=train_set.targets,
                dist=dist,
                resume=args.resume,
                overwrite=args.overwrite,
                on_epoch=on_epoch,
                fingerprint=fingerprint,
                teacher=teacher,
            )

        if not track:
            result = run_fit(None)
            if dist.is_main:
                _write_outputs(model, meta, result, out_dir)
            return 0
        run_id_file = out_dir / "checkpoints" / "mlflow_run_id"
        previous = run_id_file.read_text().strip() if args.resume and run_id_file.is_file() else None
        tags = {
            "stage": "train",
            "kind": kind,
            "data_version": data_version or "unknown",
            "git_commit": meta.extra["git_commit"],
        }
        with tracking.start_or_resume_run(f"train-{kind}", run_id=previous, tags=tags) as run:
            run_id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(run.run_id)
            if previous is None:
                run.log_params(run_params)
            result = run_fit(tracking.epoch_logger(run))
            meta.extra["mlflow_run_id"] = run.run_id
            model_dir = _write_outputs(model, meta, result, out_dir)
            run.log_metrics({f"best_{k}": v for k, v in result.best.items()} | {"best_epoch": result.best_epoch})
            run.log_artifact(model_dir, artifact_path="model")
            run.log_artifact(out_dir / "checkpoints" / "last.pt", artifact_path="checkpoints")
        return 0
    finally:
        close_distributed()


def _fits_in_memory(rows: Any) -> bool:
    """Whether the decoded RGB images stay under `_CACHE_BYTES` (manifest sizes; a guess without them)."""
    if {"width", "height"} <= set(rows.columns):
        return float((rows["width"].astype(float) * rows["height"].astype(float) * 3).sum()) <= _CACHE_BYTES
    return len(rows) <= 20_000


def _data_version(root: Path) -> str | None:
    try:
        from flows.versioning import data_version

        return data_version(root)
    except Exception as err:  # no DVC repo, no .dvc file: record as unknown rather than fail training
        log.info("no DVC data version for %s (%s)", root, err)
        return None


def _write_outputs(model: Any, meta: Any, result: Any, out_dir: Path) -> Path:
    from vit.bundle import save_bundle

    meta.extra.update(best_epoch=result.best_epoch, epochs_run=result.epochs_run, **result.best)
    model_dir = save_bundle(model.cpu(), meta, out_dir / "model")
    summary = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, **result.best}
    _write_json(out_dir / "train_metrics.json", summary)
    print(f"wrote {model_dir} (best epoch {result.best_epoch + 1}, val top-1 {result.best.get('val_top1', 0):.4f})")
    return model_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from data_checks.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def cmd_evaluate(args: argparse.Namespace, params: Params) -> int:
    """Evaluate a model folder on the test split; write metrics JSON and plots; log them to MLflow."""
    import torch
    from torch.utils.data import DataLoader

    from flows import tracking
    from vit.bundle import load_bundle
    from vit.data import create_dataset
    from vit.evaluate import compute_metrics, confusion, plot_confusion, plot_reliability, predict

    kind = "baseline" if args.baseline else "vit"
    model_dir = Path(args.model_dir or (params.baseline.out_dir if args.baseline else params.train.out_dir) / "model")
    out = Path(args.out or params.evaluate.out_dir / kind)
    root = Path(args.data or params.data.raw_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_bundle(model_dir, device=device)
    rows = _load_rows(params)
    test_set = create_dataset(root, rows, meta, "test", cache=False)
    loader = DataLoader(test_set, batch_size=params.train.batch_size, num_workers=params.train.workers)
    probs, labels = predict(model, loader, device)
    metrics = compute_metrics(probs, labels, meta.classes, params.evaluate.ece_bins)
    matrix = confusion(probs, labels, meta.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "confusion.json", {"classes": meta.classes, "matrix": matrix.tolist()})
    plots = [
        plot_confusion(matrix, meta.classes, out / "confusion_matrix.png", title=f"{meta.model} on the test split"),
        plot_reliability(probs, labels, out / "reliability.png", bins=params.evaluate.ece_bins),
    ]
    top5 = f", top-5 {metrics['test_top5']:.4f}" if "test_top5" in metrics else ""
    print(
        f"{model_dir}: test top-1 {metrics['test_top1']:.4f}{top5}, macro F1 {metrics['test_macro_f1']:.4f}, "
        f"ECE {metrics['test_ece']:.4f} on {int(metrics['test_count'])} images -> {out}"
    )
    if not args.no_tracking:
        tracking.configure(params.tracking.uri, params.tracking.experiment)
        tags = {"stage": "evaluate", "kind": kind, "model_dir": str(model_dir)}
        with tracking.start_or_resume_run(f"evaluate-{kind}", run_id=meta.extra.get("mlflow_run_id"), tags=tags) as run:
            run.log_metrics(metrics)
            for path in [*plots, out / "metrics.json", out / "confusion.json"]:
                run.log_artifact(path, artifact_path="evaluation")
    return 0
