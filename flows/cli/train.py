"""`vitops` commands of the train stage: the offline stand-in checkpoint, fine-tuning, the CNN baseline, evaluation.

vitops pretrain-standin [--out FILE] [--images N] [--epochs N]
        offline quickstart only: pretrain the stand-in "external" ViT checkpoint on rendered characters
vitops train [--baseline] [--source SRC] [--resume | --overwrite] [--epochs N] [--out-dir DIR] [--data DIR]
             [--device cpu|cuda] [--no-tracking]
        fine-tune the ViT from `train.source` (or train the CNN baseline) on the validated data; writes
        OUT_DIR/model (weights.safetensors + model.json), OUT_DIR/checkpoints and OUT_DIR/train_metrics.json.
        Multi-GPU / multi-node: `torchrun --nproc_per_node N -m vitops train ...`
vitops evaluate [MODEL_DIR] [--baseline] [--out DIR] [--data DIR] [--no-tracking]
        held-out test split: OUT/metrics.json (flat keys, DVC metrics), confusion_matrix.png, reliability.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitops.flows.config import Params
from vitops.flows.settings import dataset_of, recipe_for, run_context, same_named


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.flows.tracking import TrackingError
    from vitops.vit.bundle import BundleError
    from vitops.vit.checkpoint import CheckpointError
    from vitops.vit.data import DataError
    from vitops.vit.distill import DistillError
    from vitops.vit.sources import SourceError

    return (SourceError, DataError, CheckpointError, BundleError, TrackingError, DistillError)


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
    p.add_argument("--parent-run-id", help="log the training run as a child of this MLflow run (a retrain's)")
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
    from vitops.flows.training import pretrain_standin
    from vitops.vit.standin import StandinSpec

    p = params.pretrain
    spec = StandinSpec(**same_named(StandinSpec, p))
    spec.images = args.images or p.images
    spec.epochs = args.epochs or p.epochs
    result = pretrain_standin(spec, Path(args.out or p.out))
    print(f"wrote {result.path} (stand-in, NOT public weights; character val top-1 {result.val_top1:.3f})")
    return 0


def cmd_train(args: argparse.Namespace, params: Params) -> int:
    """Fine-tune (or train the baseline), write the model folder, log to MLflow."""
    from vitops.flows.training import train

    recipe = recipe_for(params, args.baseline, source=args.source, epochs=args.epochs, out_dir=args.out_dir)
    result = train(
        recipe,
        dataset_of(params, args.data),
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        run=run_context(params, args.parent_run_id),
        track=not args.no_tracking,
    )
    if result.is_main:
        run = f"; MLflow run {result.run_id}" if result.run_id else ""
        print(
            f"wrote {result.model_dir} (best epoch {result.best_epoch + 1}, val top-1 "
            f"{result.metrics.get('val_top1', 0):.4f}, {result.train_seconds / 60:.1f} min on {result.device}{run})"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace, params: Params) -> int:
    """Evaluate a model folder on the test split; write metrics JSON, predictions and plots; log them to MLflow."""
    from vitops.flows.evaluation import EvalSettings, evaluate

    kind = "baseline" if args.baseline else "vit"
    model_dir = Path(args.model_dir or (params.baseline.out_dir if args.baseline else params.train.out_dir) / "model")
    result = evaluate(
        model_dir,
        dataset_of(params, args.data),
        Path(args.out or params.evaluate.out_dir / kind),
        kind=kind,
        settings=EvalSettings.from_params(params),
        device=args.device,
        run=run_context(params) if not args.no_tracking else None,
    )
    m = result.metrics
    top5 = f", top-5 {m['test_top5']:.4f}" if "test_top5" in m else ""
    print(
        f"{result.model_dir}: test top-1 {m['test_top1']:.4f}{top5}, macro F1 {m['test_macro_f1']:.4f}, "
        f"ECE {m['test_ece']:.4f} on {int(m['test_count'])} images -> {result.out_dir}"
    )
    return 0
