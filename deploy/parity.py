"""Parity gate: an engine must give the same answers as the PyTorch model it was built from.

Compares logits on the same inputs (the validation split in the CLI) by the largest absolute logit
difference and by top-1 agreement, the share of images where both pick the same class. FP32 engines are
held to both; INT8 engines only to top-1 agreement (their logits move by design).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class ParityError(RuntimeError):
    """An engine failed its parity gate; the message gives the figures and the thresholds."""


@dataclass
class ParityReport:
    """Figures of one comparison and the thresholds they were held to."""

    engine: str
    images: int
    max_abs_diff: float
    top1_agreement: float
    max_abs_diff_limit: float | None
    min_top1_agreement: float

    @property
    def passed(self) -> bool:
        diff_ok = self.max_abs_diff_limit is None or self.max_abs_diff <= self.max_abs_diff_limit
        return diff_ok and self.top1_agreement >= self.min_top1_agreement

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        limit = "" if self.max_abs_diff_limit is None else f" (limit {self.max_abs_diff_limit:g})"
        return (
            f"{self.engine}: top-1 agreement {self.top1_agreement:.2%} (min {self.min_top1_agreement:.2%}), "
            f"max |logit diff| {self.max_abs_diff:.3g}{limit} on {self.images} images"
        )


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    engine: str,
    min_top1_agreement: float,
    max_abs_diff: float | None = None,
) -> ParityReport:
    """Compare candidate logits with reference logits of the same images."""
    reference = np.asarray(reference, dtype=np.float32)
    candidate = np.asarray(candidate, dtype=np.float32)
    if reference.shape != candidate.shape:
        raise ParityError(f"{engine}: output shape {candidate.shape} differs from PyTorch's {reference.shape}")
    if not np.isfinite(candidate).all():
        raise ParityError(f"{engine}: produced NaN or infinite logits")
    return ParityReport(
        engine=engine,
        images=int(reference.shape[0]),
        max_abs_diff=float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        top1_agreement=float((reference.argmax(1) == candidate.argmax(1)).mean()) if reference.size else 1.0,
        max_abs_diff_limit=max_abs_diff,
        min_top1_agreement=min_top1_agreement,
    )


def require_parity(report: ParityReport) -> ParityReport:
    """Raise `ParityError` unless the report passed."""
    if not report.passed:
        raise ParityError(f"parity gate failed: {report.describe()}; the engine was not kept")
    return report


def run_batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Apply `fn` to `images` in batches and concatenate the outputs."""
    outs = [np.asarray(fn(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)


def torch_logits(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Reference logits of a PyTorch model in eval mode on CPU, in float32."""
    import torch

    model = model.eval()

    def _run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().cpu().numpy()

    return run_batched(_run, np.ascontiguousarray(images, dtype=np.float32), batch_size)
