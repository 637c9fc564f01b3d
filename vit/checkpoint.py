"""Training checkpoints: everything needed to continue a run exactly, written atomically.

`last.pt` holds the model, optimizer, scheduler, EMA and GradScaler states, the RNG states of python, numpy
and torch on every rank, and the loop state (epochs done, optimizer steps, best validation metrics, patience
counter, history), plus a fingerprint of the settings that must match for a resume to be valid. It is
read back with `torch.load(weights_only=True)` only, so RNG states are stored as tensors and tuples.
`best.safetensors` holds the weights of the best validation epoch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitops.common.files import atomic_write
from vitops.vit.distributed import DistInfo

LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from, or would be overwritten by a fresh run."""


def _rng_state() -> dict[str, Any]:
    version, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def gather_rng_states(dist: DistInfo) -> list[dict[str, Any]]:
    state = _rng_state()
    if not dist.enabled:
        return [state]
    import torch.distributed as tdist

    states: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(states, state)
    return states


def save_checkpoint(
    path: Path,
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: Any,
    scaler: Any,
    state: Mapping[str, Any],
    rng: list[dict[str, Any]],
    fingerprint: Mapping[str, Any],
) -> None:
    payload = {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "state": dict(state),
        "fingerprint": dict(fingerprint),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(
    path: Path,
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: Any,
    scaler: Any,
    fingerprint: Mapping[str, Any],
    dist: DistInfo,
) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint ({err}); pass --overwrite to start over") from err
    saved, now = _flatten(payload.get("fingerprint", {})), _flatten(fingerprint)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"{path} was written by a different configuration ({details}); restore the settings or pass --overwrite"
        )
    raw.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if ema is not None and payload["ema"] is not None:
        ema.load_state_dict(payload["ema"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"][dist.rank])
    return dict(payload["state"])


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(state, tmp))
