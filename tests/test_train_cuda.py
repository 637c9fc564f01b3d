"""Training on CUDA (gpu): one bf16 autocast epoch of the tiny ViT through `vit.train.fit` on the GPU, the path a
fine-tune takes on a GPU machine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.vit import fit_tiny

from vitops.vit.distributed import DistInfo
from vitops.vit.train import TrainConfig


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_bf16_epoch_on_cuda_trains_and_validates(data: tuple, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0.5, patience=0, amp="bf16", workers=0)
    torch.cuda.reset_peak_memory_stats()
    model, result = fit_tiny(data, cfg, tmp_path, dist=DistInfo(device=torch.device("cuda")), show_progress=False)
    assert result.epochs_run == 1 and result.best["val_count"] == len(data[1])
    assert all(math.isfinite(v) for v in result.history[0].values() if isinstance(v, float))
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay FP32
