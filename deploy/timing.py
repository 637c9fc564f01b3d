"""Interleaved timing: the one helper that times every runner, backend and thread count in vitops.

Runners are timed in blocks, taking turns, so a noisy shared CPU slows all of them alike and their ratios stay
meaningful; thread tuning picks the fastest intra-op thread count the same way. Shared by the latency
benchmark (`deploy/latency.py`), the engine builds (`deploy/onnxrt.py`) and the roofline (`deploy/roofline.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

Runner = Callable[[np.ndarray], Any]


def percentiles_ms(seconds: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99 of durations in seconds, as milliseconds."""
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def settle(seconds: float = 0.02) -> None:
    time.sleep(seconds)


def time_in_turns(runners: dict[Any, Runner], image: np.ndarray, blocks: list[int]) -> dict[Any, list[float]]:
    """Per-call durations (s) of every runner, timed in blocks of the given sizes with the runners taking turns."""
    times: dict[Any, list[float]] = {key: [] for key in runners}
    for count in blocks:
        for key, run in runners.items():
            settle()
            run(image)
            for _ in range(count):
                start = time.perf_counter()
                run(image)
                times[key].append(time.perf_counter() - start)
    return times


def thread_candidates(cores: int) -> list[int]:
    """Thread counts worth trying on `cores` physical cores: 1, 2, 4, ... and `cores` itself."""
    candidates = {cores}
    n = 1
    while n < cores:
        candidates.add(n)
        n *= 2
    return sorted(candidates)


def tune_threads(
    make_runner: Callable[[int], Runner], image: np.ndarray, candidates: list[int], iters: int = 30, rounds: int = 3
) -> tuple[int, dict[int, float]]:
    """The intra-op thread count with the lowest batch-1 p50 latency, and the p50 (ms) of every candidate.

    More threads are not always faster: a small model's operators are too short to split, and every call
    then pays for waking and joining the workers (on this project's 2-core CPU the quickstart ViT's INT8
    engine runs 1.6x faster on one thread than on two). The candidates are timed in interleaved rounds.

    Args:
        make_runner: thread count -> runner (one session or model setting per count).
        image: a preprocessed batch of size 1.
        candidates: thread counts to try (see `thread_candidates`).
        iters: timed calls per candidate and round.
        rounds: interleaved rounds.
    """
    runners = {n: make_runner(n) for n in candidates}
    for run in runners.values():
        for _ in range(5):
            run(image)
    times = time_in_turns(runners, image, [iters] * rounds)
    p50 = {n: float(np.median(t) * 1e3) for n, t in times.items()}
    return min(p50, key=p50.__getitem__), p50
