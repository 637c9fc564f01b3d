"""Latency benchmark of one model on several backends: torch eager, ONNX Runtime FP32/INT8, OpenVINO
FP32/BF16/INT8, and on GPU torch.compile, TensorRT FP16/INT8 and torch-aot FP16/BF16/FP32.

Figures per backend: after warm-up, p50/p95/p99 latency at batch 1; throughput (images/s) at a large
batch; peak memory (growth of the process RSS on CPU, `torch.cuda.max_memory_allocated` on GPU). The
backends are timed in interleaved rounds (one call of each in turn), so a noisy shared CPU slows all of
them alike and their ratios stay meaningful. These numbers feed the latency KPI.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitops.common.files import atomic_write_bytes, utc_now
from vitops.deploy.timing import Runner, percentiles_ms, time_in_turns


@dataclass
class BenchResult:
    """One backend's figures."""

    backend: str
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_ips: float
    large_batch: int
    peak_mem_mb: float
    iters: int
    device: str = "cpu"
    note: str = ""
    threads: int = 0
    gflops: float = 0.0  # model GFLOP/s that the batch-1 p50 implies (0 = FLOPs not counted)
    samples_ms: list[float] | None = None  # every timed batch-1 call, for latency distributions


class _RssPeak:
    """Samples the process RSS in a thread; `peak` is the highest value seen (bytes)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def bench_backends(
    factories: dict[str, Callable[[], Runner]],
    image: np.ndarray,
    batch: np.ndarray,
    warmup: int = 10,
    iters: int = 100,
    throughput_rounds: int = 3,
    device: str = "cpu",
    notes: dict[str, str] | None = None,
    threads: dict[str, int] | None = None,
) -> list[BenchResult]:
    """Create each backend, then time them in interleaved rounds.

    Args:
        factories: backend name -> function creating its runner `run(images) -> outputs`. A GPU runner
            must return only after the device finished (synchronise inside).
        image: one preprocessed image batch of size 1.
        batch: a large preprocessed batch for throughput.
        warmup: untimed calls per backend at batch 1 (and one at the large batch).
        iters: timed batch-1 calls per backend.
        throughput_rounds: timed large-batch calls per backend.
        device: `cpu` (RSS growth) or `cuda` (torch peak allocated memory).
        notes: per-backend remarks for the table (e.g. random weights).
        threads: per-backend CPU thread counts, recorded with the results.
    """
    import psutil

    notes = notes or {}
    proc = psutil.Process()
    runners: dict[str, Runner] = {}
    baseline: dict[str, int] = {}
    for name, make in factories.items():
        baseline[name] = proc.memory_info().rss
        runners[name] = make()
    peaks: dict[str, float] = {}
    for name, run in runners.items():
        for _ in range(warmup):
            run(image)
        if device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            run(batch)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        else:
            with _RssPeak() as rss:
                run(batch)
            peaks[name] = max(0, rss.peak - baseline[name]) / 2**20
    # Timed in blocks, the backends taking turns: interleaving shares out the noise of a busy machine,
    # and blocks (with a pause between them) keep one runtime's spinning worker threads, which wait
    # busily for a moment after each call, from stealing cores from the next runtime.
    blocks = max(1, min(10, iters // 10))
    times = time_in_turns(runners, image, [iters // blocks + (1 if b < iters % blocks else 0) for b in range(blocks)])
    spent = {name: sum(t) for name, t in time_in_turns(runners, batch, [throughput_rounds]).items()}
    results = []
    for name in runners:
        p50, p95, p99 = percentiles_ms(times[name])
        results.append(
            BenchResult(
                backend=name,
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
                throughput_ips=throughput_rounds * len(batch) / spent[name],
                large_batch=len(batch),
                peak_mem_mb=peaks[name],
                iters=iters,
                device=device,
                note=notes.get(name, ""),
                threads=(threads or {}).get(name, 0),
                samples_ms=[round(t * 1e3, 4) for t in times[name]],
            )
        )
    return results


@dataclass
class BenchGroup:
    """Backends timed together on one device, against the torch reference of that device."""

    device: str  # cpu | cuda
    reference: str
    backends: list[str]


CPU_BACKENDS = (
    "torch-eager",
    "onnxruntime-fp32",
    "onnxruntime-int8",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
)
AOT_BACKENDS = ("torch-aot-fp16", "torch-aot-bf16", "torch-aot-fp32")  # on the device they were built for
CUDA_BACKENDS = ("torch-cuda", "torch-cuda-compile", "tensorrt-fp16", "tensorrt-int8", *AOT_BACKENDS)


def plan_bench(
    device: str, cuda_available: bool, built: set[str], devices: dict[str, str] | None = None
) -> list[BenchGroup]:
    """Which backends to time on which device: like with like.

    On a GPU machine torch on CUDA (eager and torch.compile) is the reference of the TensorRT and torch-aot
    engines, and torch on the CPU that of the ONNX Runtime and OpenVINO engines (which run on the CPU there too)
    and of torch-aot engines built for the CPU; `device` picks one side (`cpu`, `cuda`) or both (`auto`, where
    CUDA is available).

    Args:
        device: `auto`, `cpu` or `cuda`.
        cuda_available: whether torch sees a CUDA device.
        built: names of the engine backends whose files exist (e.g. `onnxruntime-int8`, `tensorrt-fp16`).
        devices: the device each torch-aot engine was built for (its metadata's `device_type`; default `cuda`).

    Raises:
        ValueError: `cuda` was asked for on a machine without CUDA, or an unknown device.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"bench device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not cuda_available:
        raise ValueError("bench --device cuda: torch sees no CUDA device here; use --device cpu")
    devices = devices or {}
    on_cpu = {b for b in AOT_BACKENDS if devices.get(b) == "cpu"}
    groups = []
    if device == "cuda" or (device == "auto" and cuda_available):
        engines = [b for b in CUDA_BACKENDS if b in ("torch-cuda", "torch-cuda-compile") or b in built - on_cpu]
        groups.append(BenchGroup("cuda", "torch-cuda", engines))
    if device in ("cpu", "auto"):
        engines = [
            b for b in (*CPU_BACKENDS, *AOT_BACKENDS) if b == "torch-eager" or b in built & (set(CPU_BACKENDS) | on_cpu)
        ]
        groups.append(BenchGroup("cpu", "torch-eager", engines))
    return groups


def torch_runner(model: Any, device: str = "cpu", compile: bool = False, threads: int = 0) -> Runner:
    """A runner for a PyTorch model (eager, or `torch.compile` with CUDA graphs on GPU).

    On GPU the model runs in FP16 autocast, the precision a serving GPU would use, and each call waits
    for the device so that the time is the latency a caller sees (host-to-device copy included).
    """
    import torch

    model = model.eval().to(device)
    if compile:
        model = torch.compile(model, mode="reduce-overhead" if device == "cuda" else "default")

    def run(images: np.ndarray) -> Any:
        # torch's thread count is per process: set it on each call, as runners with other counts may run between.
        if threads and device == "cpu" and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            x = torch.from_numpy(images).to(device)
            if device == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = model(x)
                torch.cuda.synchronize()
                return out
            return model(x)

    return run


def ort_runner(path: Path, threads: int = 0) -> Runner:
    """A runner for an ONNX Runtime CPU engine; `threads` 0 = the count tuned when the engine was built."""
    from vitops.deploy.onnxrt import session_runner

    return session_runner(path, threads)


def ov_runner(path: Path, threads: int = 0) -> Runner:
    """A runner for an OpenVINO CPU engine (checked against this CPU and OpenVINO version first); `threads` 0 =
    the count tuned when the engine was built."""
    from vitops.deploy.openvino import load_ov_engine

    return load_ov_engine(path, threads)


def cpu_runner(backend: str, path: Path, threads: int = 0) -> Runner:
    """A batch runner for a CPU engine by its backend name (`onnxruntime-*`, `openvino-*`, or `torch-aot-*` built for
    the CPU); `threads` 0 = as tuned at build."""
    if backend.startswith("torch-aot"):
        return aot_runner(path)
    return ov_runner(path, threads) if backend.startswith("openvino") else ort_runner(path, threads)


def engine_runner(backend: str, path: Path, threads: int = 0) -> Runner:
    """A batch runner for any engine by its backend name: TensorRT, torch-aot (on the device it was built for),
    ONNX Runtime or OpenVINO."""
    if backend.startswith("tensorrt"):
        return trt_runner(path)
    if backend.startswith("torch-aot"):
        return aot_runner(path)
    return cpu_runner(backend, path, threads)


def aot_runner(path: Path) -> Runner:
    """A runner for a torch-aot engine (checked against this machine first), from host memory to a finished result
    on its device, as `torch_runner` times torch."""
    import torch

    from vitops.deploy.torch_aot import load_aot_engine

    engine = load_aot_engine(path)

    def run(images: np.ndarray) -> Any:
        out = engine(torch.from_numpy(images))
        if engine.device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def trt_runner(path: Path) -> Runner:
    """A runner for a TensorRT engine (checked against this GPU and TensorRT version first)."""
    import torch

    from vitops.deploy.tensorrt import load_trt_engine

    run_engine = load_trt_engine(path)

    def run(images: np.ndarray) -> Any:
        out = run_engine(torch.from_numpy(images))
        torch.cuda.synchronize()
        return out

    return run


def format_table(results: list[BenchResult], reference: str | None = None) -> str:
    """A plain-text table; `reference` adds a column with each p50 as a multiple of that backend's."""
    ref = next((r for r in results if r.backend == reference), None)
    counted = any(r.gflops for r in results)
    header = ["backend", "p50 ms", "p95 ms", "p99 ms", f"x {reference} p50" if ref else "", "img/s @batch", "peak MB"]
    header.insert(1, "threads")
    if counted:
        header.append("GFLOP/s")
    rows = []
    for r in results:
        rows.append(
            [
                r.backend,
                str(r.threads) if r.threads else "-",
                f"{r.p50_ms:.2f}",
                f"{r.p95_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.p50_ms / ref.p50_ms:.2f}x" if ref else "",
                f"{r.throughput_ips:.0f} @{r.large_batch}",
                f"{r.peak_mem_mb:.0f}",
            ]
            + ([f"{r.gflops:.1f}"] if counted else [])
            + ([r.note] if r.note else [])
        )
    if not ref:
        header.pop(5)
        rows = [row[:5] + row[6:] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows] if i < len(row)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)] + row[len(widths) :]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def bench_report(results: list[BenchResult], context: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of a benchmark: context (model, host, settings), flat KPI metrics (for `dvc metrics`
    and the latency KPI) and one entry per backend."""
    return {"created": utc_now(), **context, "metrics": kpi_metrics(results), "results": [asdict(r) for r in results]}


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write the benchmark JSON atomically."""
    return atomic_write_bytes(Path(out), json.dumps(report, indent=2).encode("utf-8"))


def kpi_metrics(results: list[BenchResult]) -> dict[str, float]:
    """Flat metric names for MLflow and the KPI gate, e.g. `latency_p50_ms.onnxruntime-int8`."""
    metrics: dict[str, float] = {}
    for r in results:
        key = r.backend.replace(" ", "_")
        metrics[f"latency_p50_ms.{key}"] = r.p50_ms
        metrics[f"latency_p95_ms.{key}"] = r.p95_ms
        metrics[f"latency_p99_ms.{key}"] = r.p99_ms
        metrics[f"throughput_ips.{key}"] = r.throughput_ips
        metrics[f"peak_mem_mb.{key}"] = r.peak_mem_mb
        if r.gflops:
            metrics[f"gflops.{key}"] = r.gflops
    return metrics
