"""Which engine a version serves with: the fastest at batch 1 among those that agree enough with PyTorch.

`vitops build --target auto` on a CPU machine builds every CPU engine the machine supports (ONNX Runtime
FP32/INT8, OpenVINO FP32/BF16/INT8), each behind its parity gate, times the ones that passed at batch 1 in
interleaved rounds, and writes the choice to `selection.json` beside the engines: the chosen backend, why,
and every candidate with its p50, its top-1 agreement and, if it was passed over or not built, the reason.
`vitops bench` reports that engine as the target, the latency KPI reads it, and the registered pyfunc model
serves with it. The choice itself is `choose_engine`, a plain function over measured numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, utc_now
from vitops.deploy.parity import ParityError

SELECTION_FILE = "selection.json"


@dataclass
class Candidate:
    """One engine considered for serving.

    Attributes:
        backend: e.g. `openvino-int8` (the name `vitops bench` uses).
        file: the engine file, relative to the engines folder.
        p50_ms: batch-1 p50 latency timed at build (None: not timed).
        top1_agreement: with FP32 PyTorch on the parity images.
        threads: the thread count it was timed with.
    """

    backend: str
    file: str
    p50_ms: float | None
    top1_agreement: float
    threads: int = 0


@dataclass
class Selection:
    """The engine to serve with and why; `candidates` and `skipped` explain the others."""

    chosen: str
    file: str
    reason: str
    min_top1_agreement: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    onnx_sha256: str = ""
    created: str = ""


class NoEngineError(ParityError):
    """No engine passed its gate and the agreement floor (a gate that says no: exit 1); the message lists why
    each one was left out."""


def choose_engine(
    candidates: list[Candidate], min_top1_agreement: float, skipped: dict[str, str] | None = None
) -> Selection:
    """The lowest batch-1 p50 among the candidates with top-1 agreement >= `min_top1_agreement`.

    Ties go to the earlier candidate (list them in order of preference: FP32 before reduced precisions).

    Raises:
        NoEngineError: no candidate is timed and agrees enough.
    """
    skipped = dict(skipped or {})
    rows, eligible = [], []
    for c in candidates:
        row = asdict(c)
        if c.top1_agreement < min_top1_agreement:
            row["passed_over"] = f"top-1 agreement {c.top1_agreement:.2%} < {min_top1_agreement:.2%}"
        elif c.p50_ms is None:
            row["passed_over"] = "not timed"
        else:
            eligible.append(c)
        rows.append(row)
    if not eligible:
        why = [f"{r['backend']}: {r['passed_over']}" for r in rows] + [f"{k}: {v}" for k, v in skipped.items()]
        raise NoEngineError(f"no engine to serve with: {'; '.join(why) or 'none was built'}")
    best = min(eligible, key=lambda c: c.p50_ms or 0.0)
    others = [c for c in eligible if c is not best]
    runner_up = min(others, key=lambda c: c.p50_ms or 0.0) if others else None
    reason = f"lowest batch-1 p50 ({best.p50_ms:.3g} ms"
    reason += f"; next {runner_up.backend} {runner_up.p50_ms:.3g} ms)" if runner_up else ", the only candidate)"
    reason += f" among the {len(eligible)} engine(s) with top-1 agreement >= {min_top1_agreement:.2%}"
    for row in rows:
        if row["backend"] == best.backend:
            row["chosen"] = True
    return Selection(best.backend, best.file, reason, min_top1_agreement, rows, skipped)


def time_candidates(runners: dict[str, Callable[[Any], Any]], image: Any, iters: int) -> dict[str, float]:
    """Batch-1 p50 (ms) of each engine as `--target auto` times it: 5 warm-up calls each, then 3 interleaved
    rounds of `iters` calls, so that a slow spell of a shared CPU hits every engine alike."""
    import numpy as np

    from vitops.deploy.timing import time_in_turns

    for run in runners.values():
        for _ in range(5):
            run(image)
    times = time_in_turns(runners, image, [iters] * 3)
    return {backend: round(float(np.median(t) * 1e3), 4) for backend, t in times.items()}


def write_selection(folder: Path, selection: Selection, onnx_sha256: str) -> Path:
    """Write `selection.json` into the engines folder, atomically."""
    selection.onnx_sha256, selection.created = onnx_sha256, utc_now()
    return atomic_write_json(Path(folder) / SELECTION_FILE, asdict(selection))


def read_selection(folder: Path, onnx_sha256: str | None = None) -> dict[str, Any] | None:
    """The selection in `folder`, or None when there is none, it is unreadable, or it was made for another ONNX
    export than `onnx_sha256` (its engines are then of an older model)."""
    path = Path(folder) / SELECTION_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if onnx_sha256 is not None and doc.get("onnx_sha256") != onnx_sha256:
        return None
    return doc
