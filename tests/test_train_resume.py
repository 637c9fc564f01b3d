"""`vitops train --resume` after a crash (SIGKILL mid-run) ends with the same weights as an uninterrupted run,
and `torchrun` with two gloo processes trains with validation metrics reduced over both ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.vit import write_digits, write_manifest, write_params, write_tiny_checkpoint
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    write_digits(tmp / "data", size=60)
    write_manifest(tmp / "data", tmp / "manifest.csv")
    write_tiny_checkpoint(tmp / "pretrained.safetensors")
    return tmp


def _env() -> dict[str, str]:
    # One thread per process: the same kernels in the same order in every run, and two ranks fit on 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _train_cmd(params: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitops", "--params", str(params), "train", "--no-tracking", *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "weights.safetensors"))


def test_killed_run_resumes_to_bitwise_identical_weights(project: Path, tmp_path: Path) -> None:
    # The crashed run loads data in a worker process, the reference in the main process: augmentation is
    # seeded per (epoch, image), so that must not change a single bit either.
    settings = {"epochs": 6, "batch_size": 4, "ema_decay": 0.5, "mixup": 0.2, "patience": 0}
    ref_params = write_params(
        tmp_path / "ref", project / "data", project / "manifest.csv", project / "pretrained.safetensors", **settings
    )
    crash_params = write_params(
        tmp_path / "crash",
        project / "data",
        project / "manifest.csv",
        project / "pretrained.safetensors",
        **settings,
        workers=1,
    )
    subprocess.run(_train_cmd(ref_params), check=True, env=_env(), cwd=tmp_path, timeout=300)

    crash_out = tmp_path / "crash" / "out" / "vit"
    last = crash_out / "checkpoints" / "last.pt"
    proc = subprocess.Popen(_train_cmd(crash_params), env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (crash_out / "model").exists()
    done = torch.load(last, weights_only=True)["state"]["epoch"]
    assert 1 <= done < 6

    subprocess.run(_train_cmd(crash_params, "--resume"), check=True, env=_env(), cwd=tmp_path, timeout=300)
    ref, resumed = _weights(tmp_path / "ref" / "out" / "vit"), _weights(crash_out)
    assert ref.keys() == resumed.keys()
    for name in ref:
        assert torch.equal(ref[name], resumed[name]), f"{name} differs after resume"
    history = json.loads((crash_out / "train_metrics.json").read_text())
    assert history["epochs_run"] == 6


def test_torchrun_two_gloo_processes_reduce_metrics(project: Path, tmp_path: Path) -> None:
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    params = write_params(tmp_path, project / "data", project / "manifest.csv", project / "pretrained.safetensors")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "vitops", "--params", str(params), "train", "--no-tracking", "--device", "cpu",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=_env(), cwd=tmp_path, timeout=300)
    import pandas as pd

    val_images = (pd.read_csv(project / "manifest.csv")["split"] == "val").sum()
    metrics = json.loads((tmp_path / "out" / "vit" / "train_metrics.json").read_text())
    assert metrics["val_count"] == val_images  # both ranks' shards, each image once
    assert 0.0 <= metrics["val_top1"] <= 1.0
    ckpt = torch.load(tmp_path / "out" / "vit" / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert ckpt["fingerprint"]["world_size"] == 2
    # what the retrain flow's train task hands on after a torchrun fine-tune: read from the files rank 0 wrote
    from vitops.flows.training import read_train_result

    result = read_train_result("vit", tmp_path / "out" / "vit")
    assert result.model_dir == tmp_path / "out" / "vit" / "model" and (result.model_dir / "model.json").is_file()
    assert result.world_size == 2 and result.epochs_run == metrics["epochs_run"]
    assert result.best_epoch == metrics["best_epoch"] and result.metrics["val_top1"] == metrics["val_top1"]
