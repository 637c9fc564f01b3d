"""The fine-tuning loop as functions: `train_one_epoch`, `evaluate` and `fit`, built from timm's parts.

Data: each split decoded once (`vit.decode`), augmented in batches on the device (`vit.augment`, `vit.loader`).
Recipe: AdamW with layer-wise lr decay (`timm.optim.create_optimizer_v2`), warmup + cosine schedule updated
every optimizer step (`timm.scheduler.create_scheduler_v2`), label smoothing, optional Mixup/CutMix
(`timm.data.Mixup` + `SoftTargetCrossEntropy`), optional EMA (`timm.utils.ModelEmaV3`), bf16 autocast on
GPU, optional channels_last and `torch.compile`, gradient accumulation, class-balanced loss or sampler, early
stopping on validation top-1, and DDP when launched by torchrun.

`fit` writes `last.pt` (everything needed to continue) after every epoch, atomically, and
`best.safetensors` when validation improves. With `resume=True` it continues from `last.pt`; the run then ends
with the same weights as one that was never interrupted (bitwise on CPU: the same operations run in the same
order from the same restored state, including every rank's RNG states and the per-epoch sampler order).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitops.vit.checkpoint import (
    BEST_WEIGHTS,
    LAST_CHECKPOINT,
    CheckpointError,
    gather_rng_states,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from vitops.vit.distributed import DistInfo, all_reduce_sum, barrier, broadcast_flag

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, Mapping[str, float]], None]


@dataclass
class TrainConfig:
    """The fine-tuning recipe (defaults suit small fine-tuning sets; params.yaml `train` sets them).

    Attributes:
        epochs: length of the cosine schedule.
        batch_size: images per process per micro-step.
        accum_steps: micro-steps per optimizer update (gradient accumulation).
        lr: peak learning rate for the effective batch (batch_size x accum_steps x world size).
        layer_decay: layer-wise lr decay for transformers; None or 1.0 turns it off.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        warmup_lr: learning rate at the start of warmup.
        min_lr: learning rate at the end of the cosine.
        label_smoothing: smoothing of the one-hot targets.
        mixup: Mixup alpha; 0 turns it off.
        cutmix: CutMix alpha; 0 turns it off.
        ema_decay: decay of an EMA of the weights that is validated and kept instead; 0 turns it off.
        class_balance: `loss` (inverse-frequency class weights), `sampler` (class-balanced sampling) or `none`.
        patience: epochs without validation improvement before stopping; 0 turns early stopping off.
        clip_grad: max gradient norm; None turns clipping off.
        seed: seed for weights of new layers, augmentation, sampling and dropout.
        amp: `auto` (bf16 on CUDA, off on CPU), `bf16`, `fp16` (with a GradScaler) or `off`.
        channels_last: use the channels-last memory format (helps CNNs on GPUs).
        compile: run the model's forward and backward (and a teacher's forward) through `torch.compile`.
        workers: loader processes per training process: for per-image augmentation (`augment_on: loader`), or to
            gather batches on the host when the GPU cannot hold the decoded images (`vit.loader`).
        deterministic: ask torch for deterministic kernels (slower on GPU; CPU runs are deterministic anyway).
        distill: `hard` or `soft` distillation when `fit` is given a teacher (vit/distill.py).
        distill_alpha: weight of the teacher's term against the labels' (1 - alpha).
        distill_temperature: temperature of `soft` distillation.
    """

    epochs: int = 30
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 5e-4
    layer_decay: float | None = 0.85
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.0
    class_balance: str = "loss"
    patience: int = 12
    clip_grad: float | None = None
    seed: int = 0
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    deterministic: bool = False
    distill: str = "hard"
    distill_alpha: float = 0.5
    distill_temperature: float = 3.0


@dataclass
class FitResult:
    """What `fit` did.

    Attributes:
        best_epoch: epoch (0-based) whose weights the model now holds.
        best: validation metrics of that epoch.
        epochs_run: epochs completed, including those of an earlier, resumed run.
        stopped_early: whether patience ran out before `epochs`.
        history: per-epoch metrics.
    """

    best_epoch: int
    best: dict[str, float]
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`, or None for full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


def create_loaders(
    train_set: Dataset,
    val_set: Dataset,
    cfg: TrainConfig,
    dist: DistInfo,
    targets: list[int] | None = None,
    num_classes: int | None = None,
) -> tuple[Any, Any]:
    """Training loader (shuffled or class-balanced, sharded over ranks) and validation loader (exact shards).

    Decoded image datasets (`vit.data.ImageRows`) with a batch transform go through a `DeviceLoader` (batches
    augmented on the device); other datasets, and training sets augmented per image, through a DataLoader.
    """
    from torch.utils.data import DistributedSampler

    from vitops.vit.data import EpochSampler, ImageRows, ShardSampler, sample_weights
    from vitops.vit.loader import DeviceLoader

    if cfg.class_balance == "sampler":
        if targets is None or num_classes is None:
            raise ValueError("class_balance=sampler needs the training targets and the number of classes")
        sampler = ShardSampler(
            len(train_set), dist.rank, dist.world_size, weights=sample_weights(targets, num_classes), seed=cfg.seed
        )
    else:
        sampler = DistributedSampler(
            train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    # Mixup needs even, full batches; BatchNorm cannot train on a last batch of one image.
    drop_last = len(sampler) > cfg.batch_size and (mixing or len(sampler) % cfg.batch_size == 1)
    val_sampler = ShardSampler(len(val_set), dist.rank, dist.world_size)
    common = dict(num_workers=cfg.workers, pin_memory=dist.device.type == "cuda", persistent_workers=cfg.workers > 0)
    device_args = dict(device=dist.device, seed=cfg.seed, rank=dist.rank, workers=cfg.workers)
    train_loader: Any
    if isinstance(train_set, ImageRows) and train_set.batch_transform is not None:
        train_loader = DeviceLoader(train_set, sampler, cfg.batch_size, drop_last=drop_last, **device_args)
    else:
        if isinstance(train_set, ImageRows):
            train_set.seed = cfg.seed
            sampler = EpochSampler(sampler, len(train_set))
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, **common)
    val_loader: Any
    if isinstance(val_set, ImageRows) and val_set.batch_transform is not None:
        val_loader = DeviceLoader(val_set, val_sampler, cfg.batch_size, **device_args)
    else:
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    *,
    epoch: int,
    device: torch.device,
    num_updates: int,
    mixup_fn: Any = None,
    ema: Any = None,
    scaler: Any = None,
    teacher: nn.Module | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, float], int]:
    """One pass over `loader` with gradient accumulation and per-update lr scheduling. With a `teacher`,
    `loss_fn` is a `DistillationLoss` and also gets the teacher's logits for the same (augmented) images.

    Returns:
        Training metrics (loss averaged over all ranks, lr, img_per_s) and the updated optimizer-step count.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    model.train()
    dtype = amp_dtype(cfg.amp, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps = len(loader)
    total_images = len(loader.sampler) if hasattr(loader.sampler, "__len__") else None
    # disable=None: no bar when stderr is not a terminal (logs, CI, a Prefect worker); TQDM_DISABLE still applies
    bar_args = {"disable": None if show_progress and not os.environ.get("TQDM_DISABLE") else True}
    bar = tqdm(total=total_images, unit="img", unit_scale=True, desc=f"epoch {epoch + 1}/{cfg.epochs}", **bar_args)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.float64)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        last_micro = (step + 1) % cfg.accum_steps == 0 or step + 1 == steps
        # DDP: average gradients only on the micro-step that updates the weights.
        sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(images)
                loss = loss_fn(logits, targets) if teacher is None else loss_fn(logits, targets, teacher(images))
            scaled = loss / cfg.accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if last_micro:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model.module if hasattr(model, "module") else model, step=num_updates)
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        bar.update(images.shape[0])
        if not bar.disable and (step % 10 == 0 or step + 1 == steps):  # .item() waits for the device
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the rate counts the work queued on the GPU, not only its launch
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum, seen]))
    metrics = {
        "train_loss": float(totals[0] / totals[1].clamp(min=1)),
        "lr": float(max(g["lr"] for g in optimizer.param_groups)),
        "train_img_per_s": float(totals[1]) / max(elapsed, 1e-9),
    }
    return metrics, num_updates


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "off",
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over the loader, summed over all ranks.

    Returns:
        `loss`, `top1`, `top5` (fractions in 0..1) and `count` (images evaluated on all ranks together).
    """
    model.eval()
    dtype = amp_dtype(amp, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    for images, targets in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack(
            [
                nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(targets.numel()), device=device, dtype=torch.float64),
            ]
        )
    sums = all_reduce_sum(sums)
    count = float(sums[3])
    n = max(count, 1.0)
    return {"loss": float(sums[0]) / n, "top1": float(sums[1]) / n, "top5": float(sums[2]) / n, "count": count}


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    *,
    num_classes: int,
    targets: list[int] | None = None,
    dist: DistInfo | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch: EpochCallback | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    teacher: nn.Module | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train `model` on `train_set`, validate every epoch, keep the best weights, checkpoint every epoch.

    Args:
        model: the network (on CPU; moved to the device of `dist`). On return it holds the best weights.
        train_set: training dataset yielding (image tensor, class index).
        val_set: validation dataset.
        cfg: the recipe.
        checkpoint_dir: where `last.pt` and `best.safetensors` are written (rank 0 only).
        num_classes: outputs of the model.
        targets: class index of every training sample (for class balancing).
        dist: process placement; None for a single process on CPU.
        resume: continue from `checkpoint_dir/last.pt` when it exists.
        overwrite: start afresh even if `checkpoint_dir` holds an earlier run's checkpoint.
        on_epoch: called on rank 0 after every epoch with (epoch, metrics).
        fingerprint: settings that must match for a resume to be valid (model, data, source, teacher).
        teacher: a `vit.distill.Teacher` to distil from (cfg.distill, distill_alpha, distill_temperature).
        show_progress: draw tqdm bars on rank 0 (TQDM_DISABLE=1 also turns them off).

    Raises:
        CheckpointError: if a checkpoint exists and neither `resume` nor `overwrite` is set, or the checkpoint
            was written by a different configuration.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from vitops.vit.data import class_weights

    dist = dist or DistInfo()
    device = dist.device
    checkpoint_dir = Path(checkpoint_dir)
    last_path = checkpoint_dir / LAST_CHECKPOINT
    fingerprint = {
        "config": _config_fingerprint(cfg, distilling=teacher is not None),
        "world_size": dist.world_size,
        **dict(fingerprint or {}),
    }
    if last_path.exists() and not (resume or overwrite):
        raise CheckpointError(
            f"{checkpoint_dir} holds a checkpoint of an earlier run; pass --resume to continue it or --overwrite "
            "to start over (which replaces it)"
        )
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed + dist.rank)

    raw = model.to(device)
    if cfg.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    layer_decay = cfg.layer_decay if cfg.layer_decay and cfg.layer_decay < 1.0 else None
    # Fused: one kernel per parameter group (CUDA) or one pass over each tensor (CPU), not a dozen ops per tensor.
    optimizer = create_optimizer_v2(
        raw, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=layer_decay, fused=True
    )
    train_loader, val_loader = create_loaders(train_set, val_set, cfg, dist, targets, num_classes)
    updates_per_epoch = max(1, math.ceil(len(train_loader) / cfg.accum_steps))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    weight = None
    if cfg.class_balance == "loss" and targets is not None:
        weight = class_weights(targets, num_classes).to(device)
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
        )
        loss_fn: nn.Module = SoftTargetCrossEntropy() if weight is None else _WeightedSoftTargetCE(weight)
    else:
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    if teacher is not None:
        from vitops.vit.distill import DistillationLoss

        teacher = teacher.to(device)
        loss_fn = DistillationLoss(loss_fn, cfg.distill, cfg.distill_alpha, cfg.distill_temperature)  # type: ignore[arg-type]
    ema = ModelEmaV3(raw, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    state = {"epoch": 0, "num_updates": 0, "best": None, "bad_epochs": 0, "history": []}
    if resume and last_path.exists():
        state = load_checkpoint(last_path, raw, optimizer, scheduler, ema, scaler, fingerprint, dist)
        log.info("resuming %s after epoch %d", last_path, state["epoch"])
    elif resume:
        log.info("no checkpoint in %s; starting from the beginning", checkpoint_dir)

    train_module: nn.Module = raw
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    eval_module = ema.module if ema is not None else raw
    if cfg.compile:
        # The model's forward and backward (the teacher's forward) run compiled; the augmentation before them
        # and Mixup, the loss and the fused optimizer step stay eager. A last, smaller batch compiles once more.
        train_module = torch.compile(train_module)
        eval_module = torch.compile(eval_module)
        if teacher is not None:
            teacher = torch.compile(teacher)

    stopped_early = False
    num_updates = state["num_updates"]
    for epoch in range(state["epoch"], cfg.epochs):
        (getattr(train_loader, "set_epoch", None) or train_loader.sampler.set_epoch)(epoch)
        train_metrics, num_updates = train_one_epoch(
            train_module,
            train_loader,
            optimizer,
            scheduler,
            loss_fn,
            cfg,
            epoch=epoch,
            device=device,
            num_updates=num_updates,
            mixup_fn=mixup_fn,
            ema=ema,
            scaler=scaler,
            teacher=teacher,
            show_progress=show_progress and dist.is_main,
        )
        val = evaluate(eval_module, val_loader, device, cfg.amp, cfg.channels_last)
        metrics = {**train_metrics, **{f"val_{k}": v for k, v in val.items()}}
        best = state["best"]
        improved = best is None or (val["top1"], -val["loss"]) > (best["val_top1"], -best["val_loss"])
        if improved:
            state["best"] = {**metrics, "epoch": epoch}
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        state["history"].append({**metrics, "epoch": epoch})
        state["epoch"], state["num_updates"] = epoch + 1, num_updates
        rng = gather_rng_states(dist)
        if dist.is_main:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if improved:
                save_weights(eval_module_state(ema, raw), checkpoint_dir / BEST_WEIGHTS)
            save_checkpoint(last_path, raw, optimizer, scheduler, ema, scaler, state, rng, fingerprint)
            if on_epoch is not None:
                on_epoch(epoch, {**metrics, "best_val_top1": state["best"]["val_top1"]})
            log.info(
                "epoch %d/%d: train_loss %.4f val_loss %.4f val_top1 %.4f (%.0f img/s)",
                epoch + 1,
                cfg.epochs,
                metrics["train_loss"],
                val["loss"],
                val["top1"],
                metrics["train_img_per_s"],
            )
        stop = cfg.patience > 0 and state["bad_epochs"] >= cfg.patience
        if broadcast_flag(stop, device):
            stopped_early = state["epoch"] < cfg.epochs
            log.info("early stop: no validation improvement for %d epochs", state["bad_epochs"])
            break
    barrier()
    best_path = checkpoint_dir / BEST_WEIGHTS
    if best_path.exists():
        from safetensors.torch import load_file

        raw.load_state_dict(load_file(str(best_path), device=str(device)))
    best = state["best"] or {}
    return FitResult(
        best_epoch=int(best.get("epoch", -1)),
        best={k: float(v) for k, v in best.items() if k.startswith("val_")},
        epochs_run=state["epoch"],
        stopped_early=stopped_early,
        history=state["history"],
    )


def eval_module_state(ema: Any, raw: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that are validated (the EMA's when EMA is on), as plain CPU tensors."""
    module = ema.module if ema is not None else raw
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


class _WeightedSoftTargetCE(nn.Module):
    """Soft-target cross-entropy with per-class weights (Mixup targets with class_balance=loss)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (-(target * self.weight) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _config_fingerprint(cfg: TrainConfig, distilling: bool = False) -> dict[str, Any]:
    # Settings that do not change the result may differ between the interrupted and the resumed run.
    skip = {"workers", "compile"} | (set() if distilling else {"distill", "distill_alpha", "distill_temperature"})
    return {k: v for k, v in asdict(cfg).items() if k not in skip}
