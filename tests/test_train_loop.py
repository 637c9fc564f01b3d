"""The training loop: determinism, checkpoints, early stopping, recipe options, refusal to clobber a run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.vit import fit_tiny

from vitops.vit.checkpoint import BEST_WEIGHTS, LAST_CHECKPOINT, CheckpointError
from vitops.vit.train import TrainConfig

CFG = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0.5, patience=0, class_balance="loss")


def test_same_seed_gives_identical_weights_and_checkpoint_holds_full_state(data: tuple, tmp_path: Path) -> None:
    first, result = fit_tiny(data, CFG, tmp_path / "a")
    second, _ = fit_tiny(data, CFG, tmp_path / "b")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert result.epochs_run == 2 and len(result.history) == 2
    assert result.best["val_count"] == 10  # every val image counted once
    ckpt = torch.load(tmp_path / "a" / LAST_CHECKPOINT, weights_only=True)
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "rng", "state"} <= set(ckpt)
    assert ckpt["state"]["epoch"] == 2 and set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert (tmp_path / "a" / BEST_WEIGHTS).is_file()
    assert not list((tmp_path / "a").glob("*.tmp"))  # atomic writes leave no temp files


def test_new_run_refuses_to_replace_an_earlier_checkpoint(data: tuple, tmp_path: Path) -> None:
    fit_tiny(data, replace(CFG, epochs=1), tmp_path)
    before = (tmp_path / LAST_CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        fit_tiny(data, replace(CFG, epochs=1), tmp_path)
    assert (tmp_path / LAST_CHECKPOINT).read_bytes() == before
    with pytest.raises(CheckpointError, match=r"config\.lr"):
        fit_tiny(data, replace(CFG, epochs=1, lr=0.5), tmp_path, resume=True)


def test_early_stopping_stops_when_validation_stalls(data: tuple, tmp_path: Path) -> None:
    cfg = replace(CFG, epochs=6, lr=1e-9, warmup_lr=1e-9, min_lr=1e-9, patience=1)
    _, result = fit_tiny(data, cfg, tmp_path)
    assert result.stopped_early and result.epochs_run < 6
    assert result.best_epoch == 0


def test_mixup_ema_sampler_accumulation_clipping_run(data: tuple, tmp_path: Path) -> None:
    cfg = replace(
        CFG,
        epochs=1,
        mixup=0.8,
        cutmix=1.0,
        ema_decay=0.9,
        class_balance="sampler",
        accum_steps=2,
        clip_grad=1.0,
        channels_last=True,
    )
    model, result = fit_tiny(data, cfg, tmp_path)
    assert 0.0 <= result.best["val_top1"] <= 1.0
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    ckpt = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert ckpt["ema"] is not None
    # The model returned holds the validated (EMA) weights.
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / BEST_WEIGHTS))
    assert torch.equal(model.state_dict()["head.weight"], best["head.weight"])


def test_epoch_callback_gets_metrics(data: tuple, tmp_path: Path) -> None:
    seen: list = []
    fit_tiny(data, replace(CFG, epochs=1), tmp_path, on_epoch=lambda e, m: seen.append((e, dict(m))))
    assert [e for e, _ in seen] == [0]
    assert {"train_loss", "val_loss", "val_top1", "lr", "train_img_per_s"} <= set(seen[0][1])


@pytest.mark.slow
def test_compiled_training_step_matches_eager_and_compiles_once_per_shape(data: tuple, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = replace(CFG, epochs=2, compile=True)
    _, eager = fit_tiny(data, replace(cfg, compile=False), tmp_path / "eager")
    _, compiled = fit_tiny(data, cfg, tmp_path / "compiled")
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    # train forward + backward, validation forward: a few graphs for the whole run, not one per step
    assert 1 <= counters["stats"]["unique_graphs"] <= 6
