"""The training stage: one run of a recipe (the ViT fine-tune or the CNN baseline) on the validated data, and
the offline quickstart's stand-in checkpoint.

    train(recipe, dataset, run=...)         data, model and teacher, the fit, the model folder, its MLflow run
                                                                                            -> TrainResult
    pretrain_standin(spec, out)             the stand-in "external" checkpoint (not public weights) -> PretrainResult

Under torchrun every rank calls `train`; only rank 0 writes and logs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, sha256_file
from vitops.flows import tracking
from vitops.flows.settings import Dataset, Recipe
from vitops.flows.tracking import RunContext

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    kind: str  # vit | baseline
    model_dir: Path
    out_dir: Path
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    train_seconds: float
    device: str
    world_size: int
    data_version: str | None
    run_id: str | None
    is_main: bool = True


@dataclass
class PretrainResult:
    path: Path
    val_top1: float


def resolve_source(source: str, work: Path) -> str:
    """`mlflow:models:/...` becomes `file:<downloaded model folder>`; other sources pass through."""
    if not source.startswith("mlflow:"):
        return source
    return f"file:{tracking.download_model(source.removeprefix('mlflow:'), work)}"


def load_teacher_model(source: str | None, classes: list[str], meta: Any, work: Path) -> tuple[Any, str | None]:
    """The teacher named by `train.teacher` (a vitops model folder or a registered model) and the sha256 of
    its weights, or (None, None) without one."""
    if not source:
        return None, None
    from vitops.vit.bundle import WEIGHTS_FILE
    from vitops.vit.distill import DistillError, load_teacher

    resolved = resolve_source(source, work)
    if not resolved.startswith("file:"):
        raise DistillError(
            f"train.teacher {source!r}: a teacher must be a vitops model folder trained on the same classes "
            "(file:artifacts/train/baseline/model) or a registered model (mlflow:models:/<name>@<alias>)"
        )
    folder = Path(resolved.removeprefix("file:"))
    teacher = load_teacher(folder, classes, meta, source)
    return teacher, sha256_file(folder / WEIGHTS_FILE)


def train(
    recipe: Recipe,
    dataset: Dataset,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    run: RunContext | None = None,
    track: bool = True,
) -> TrainResult:
    """Fine-tune the ViT (or train the CNN baseline) of `recipe` on the validated data; write OUT_DIR/model,
    checkpoints and train_metrics.json; with `track`, log the run to the MLflow of `run` (which also serves
    `mlflow:` weight sources and teachers)."""
    import torch

    from vitops.vit.data import AugmentParams, class_names, create_dataset, resolve_meta
    from vitops.vit.distributed import close_distributed, init_distributed
    from vitops.vit.sources import create_model
    from vitops.vit.train import TrainConfig, fit

    out_dir, root = recipe.out_dir, dataset.root
    cfg = TrainConfig(**recipe.config)
    baseline = recipe.kind == "baseline"
    rows = dataset.rows()
    classes = class_names(rows, list(dataset.classes))
    dist = init_distributed(device)
    try:
        track = dist.is_main and track and run is not None
        registered = any(str(src).startswith("mlflow:") for src in (recipe.source, recipe.teacher))
        if run is not None and (track or registered):
            run.configure()
        with tempfile.TemporaryDirectory(prefix="vitops-source-") as work:
            source = resolve_source(recipe.source, Path(work))
            torch.manual_seed(cfg.seed)  # the new head starts the same in every run and on every rank
            model, arch, kwargs = create_model(
                source, recipe.model, len(classes), recipe.img_size, recipe.model_kwargs, allow_scratch=True
            )
            meta = resolve_meta(model, arch, classes, recipe.img_size, kwargs, crop_pct=recipe.crop_pct)
            teacher, teacher_sha = load_teacher_model(recipe.teacher, classes, meta, Path(work) / "teacher")
        if recipe.source == "scratch" and not baseline:
            log.warning("training the ViT from random weights (source: scratch) as explicitly configured")
        data_version = _data_version(root)
        meta.extra.update(
            source=recipe.source, kind=recipe.kind, data_version=data_version, git_commit=tracking.git_commit()
        )
        if teacher is not None:
            meta.extra.update(teacher=recipe.teacher, distill=cfg.distill)
        augment = AugmentParams(**recipe.augment)
        # Decoded once (in memory, or memory-mapped from recipe.decode_cache and reused by later runs)
        train_set = create_dataset(root, rows, meta, "train", augment, cache_dir=recipe.decode_cache)
        val_set = create_dataset(root, rows, meta, "val", cache_dir=recipe.decode_cache)
        fingerprint = {"model": arch, "model_kwargs": kwargs, "classes": classes, "source": recipe.source}
        fingerprint["train_images"] = len(train_set)
        if teacher is not None:
            fingerprint["teacher"] = {"source": recipe.teacher, "weights_sha256": teacher_sha}
        run_params = {
            "kind": recipe.kind,
            "model": arch,
            "source": recipe.source,
            "teacher": recipe.teacher or "none",
            "img_size": recipe.img_size,
            **{f"model.{k}": v for k, v in kwargs.items()},
            **recipe.config,
            "num_classes": len(classes),
            "train_images": len(train_set),
            "val_images": len(val_set),
            "world_size": dist.world_size,
            "device": str(dist.device),
        }

        def run_fit(on_epoch: Any) -> tuple[Any, float]:
            start = time.perf_counter()
            result = fit(
                model,
                train_set,
                val_set,
                cfg,
                out_dir / "checkpoints",
                num_classes=len(classes),
                targets=train_set.targets,
                dist=dist,
                resume=resume,
                overwrite=overwrite,
                on_epoch=on_epoch,
                fingerprint=fingerprint,
                teacher=teacher,
            )
            return result, time.perf_counter() - start

        def outcome(result: Any, seconds: float, run_id: str | None) -> TrainResult:
            return TrainResult(
                kind=recipe.kind,
                model_dir=out_dir / "model",
                out_dir=out_dir,
                best_epoch=result.best_epoch,
                epochs_run=result.epochs_run,
                metrics=dict(result.best),
                train_seconds=seconds,
                device=str(dist.device),
                world_size=dist.world_size,
                data_version=data_version,
                run_id=run_id,
                is_main=dist.is_main,
            )

        def write_outputs(result: Any, seconds: float) -> Path:
            from vitops.vit.bundle import save_bundle

            device_hours = seconds * dist.world_size / 3600
            meta.extra.update(best_epoch=result.best_epoch, epochs_run=result.epochs_run, **result.best)
            meta.extra.update(train_seconds=round(seconds, 3), train_device_hours=device_hours, device=str(dist.device))
            model_dir = save_bundle(model.cpu(), meta, out_dir / "model")
            summary = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, **result.best}
            summary.update(train_seconds=seconds, train_device_hours=device_hours, world_size=dist.world_size)
            atomic_write_json(out_dir / "train_metrics.json", summary)
            return model_dir

        if not track:
            result, seconds = run_fit(None)
            if dist.is_main:
                write_outputs(result, seconds)
            return outcome(result, seconds, None)
        run_id_file = out_dir / "checkpoints" / "mlflow_run_id"
        previous = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
        tags = {
            "stage": "train",
            "kind": recipe.kind,
            "data_version": data_version or "unknown",
            "git_commit": meta.extra["git_commit"],
        }
        assert run is not None
        name = f"train-{recipe.kind}"
        with tracking.start_or_resume_run(name, run_id=previous, tags=tags, parent_run_id=run.parent_run_id) as handle:
            run_id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(handle.run_id)
            if previous is None:
                handle.log_params(run_params)
            result, seconds = run_fit(tracking.epoch_logger(handle))
            meta.extra["mlflow_run_id"] = handle.run_id
            model_dir = write_outputs(result, seconds)
            best = {f"best_{k}": v for k, v in result.best.items()}
            handle.log_metrics(best | {"best_epoch": result.best_epoch, "train_seconds": seconds})
            handle.log_artifact(model_dir, artifact_path="model")
            handle.log_artifact(out_dir / "checkpoints" / "last.pt", artifact_path="checkpoints")
        return outcome(result, seconds, handle.run_id)
    finally:
        close_distributed()


def read_train_result(kind: str, out_dir: Path) -> TrainResult:
    """The result of a training run another process made (torchrun's workers), from the files it wrote."""
    from vitops.vit.bundle import read_meta

    summary = json.loads((out_dir / "train_metrics.json").read_text(encoding="utf-8"))
    meta = read_meta(out_dir / "model")
    run_keys = ("best_epoch", "epochs_run", "train_seconds", "train_device_hours", "world_size")
    return TrainResult(
        kind=kind,
        model_dir=out_dir / "model",
        out_dir=out_dir,
        best_epoch=int(summary["best_epoch"]),
        epochs_run=int(summary["epochs_run"]),
        metrics={k: float(v) for k, v in summary.items() if k not in run_keys},  # the best epoch's, as `fit` saw
        train_seconds=float(summary["train_seconds"]),
        device=str(meta.extra.get("device", "")),
        world_size=int(summary.get("world_size", 1)),
        data_version=meta.extra.get("data_version"),
        run_id=meta.extra.get("mlflow_run_id"),
    )


def pretrain_standin(spec: Any, out: Path, work_dir: Path = Path("artifacts/standin-work")) -> PretrainResult:
    """Pretrain the stand-in "external" checkpoint of the offline quickstart (not public weights) into `out`;
    its own checkpoints go to `work_dir`, never next to the shipped file."""
    from vitops.vit.standin import pretrain_standin as _pretrain

    info = _pretrain(spec, Path(out), work_dir=work_dir)
    return PretrainResult(path=Path(out), val_top1=float(info["val_top1"]))


def _data_version(root: Path) -> str | None:
    try:
        from vitops.flows.versioning import data_version

        return data_version(root)
    except Exception as err:  # no DVC repo, no .dvc file: record as unknown rather than fail training
        log.info("no DVC data version for %s (%s)", root, err)
        return None
