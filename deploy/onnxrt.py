"""ONNX Runtime CPU engines: graph optimisation, thread settings, INT8 static (QDQ) and dynamic quantization.

An ONNX Runtime "engine" is an ONNX file ready for the CPU: the FP32 graph after ORT's graph optimisations
(saved at the portable `extended` level; `all` adds CPU-layout rewrites at load time), or an INT8 model.
Static INT8 uses QDQ format with per-channel weights, calibrated on validation images through a
`CalibrationDataReader`, after `quant_pre_process` (symbolic shape inference + basic optimisation).
Dynamic INT8 quantizes weights ahead of time and activations per batch at run time.

Measured on this project's CPU (2 cores with AVX-512 VNNI, see bench/latency_targets.py): quantizing only
the weight MatMul/Gemm nodes, without quantizing their outputs (so ORT fuses them into
`MatMulIntegerToFloat` / `DynamicQuantizeMatMul`), is both the fastest and the most accurate choice;
quantizing the attention-score MatMuls, Softmax or Add as well costs agreement and gains no speed.
Every engine passes the parity gate before it is written (atomically, with metadata beside it).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vitops.common.files import atomic_copy, sha256_file, utc_now
from vitops.deploy.engine_meta import EngineMeta, vitops_version, write_meta
from vitops.deploy.parity import ParityReport, compare_logits, require_parity, run_batched

log = logging.getLogger(__name__)

OptLevel = Literal["disable", "basic", "extended", "all"]


@dataclass
class QuantSettings:
    """How to quantize an ONNX model to INT8 for ONNX Runtime (or, symmetric, for TensorRT's explicit Q/DQ).

    Attributes:
        mode: `static` (QDQ, calibrated) or `dynamic` (activations quantized per batch at run time).
        op_types: node types to quantize.
        weights_only: quantize only MatMuls with a weight input, leaving attention scores (Q·Kᵀ, A·V) in float.
        per_channel: per-output-channel weight scales.
        calibrate_method: `minmax`, `entropy` or `percentile` (static only).
        activation_symmetric: signed, zero-centred activations (what TensorRT's explicit Q/DQ needs).
        reduce_range: 7-bit weights, for CPUs without VNNI where u8×s8 products can saturate.
        quantize_outputs: also quantize the outputs of quantized nodes (keeps chains in INT8; slower here).
        exclude: parts left in float: `head` (the classifier) and/or `patch_embed` (the first Conv).
    """

    mode: Literal["static", "dynamic"] = "static"
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    weights_only: bool = True
    per_channel: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_symmetric: bool = False
    reduce_range: bool = False
    quantize_outputs: bool = False
    exclude: tuple[str, ...] = field(default_factory=tuple)


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share execution units, so ORT gains nothing from them)."""
    import os

    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model name, e.g. `Intel(R) Xeon(R) Processor`, with AVX-512 VNNI and AMX-INT8 (the INT8 matrix
    instructions ONNX Runtime uses) noted when present."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    present = flags.split()
    features = [label for flag, label in (("avx512_vnni", "AVX-512 VNNI"), ("amx_int8", "AMX-INT8")) if flag in present]
    return f"{name} ({', '.join(features)})" if features else name


def session_options(threads: int = 0, opt_level: OptLevel = "all", optimized_path: Path | None = None) -> Any:
    """ONNX Runtime session options.

    Args:
        threads: intra-op threads; 0 = one per physical core. Inter-op is 1: a ViT graph is one chain.
        opt_level: graph optimisation level.
        optimized_path: where ORT saves the optimised graph, if given.
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[opt_level]
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def create_session(path: Path, threads: int = 0, opt_level: OptLevel = "all") -> Any:
    """An ONNX Runtime CPU session for an ONNX file."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, opt_level), providers=["CPUExecutionProvider"])


def engine_threads(path: Path) -> int:
    """The intra-op thread count an engine was tuned for at build time (`vitops build`); 0 when it has none
    (no metadata, or built before tuning existed), which `create_session` reads as one per physical core."""
    from vitops.deploy.engine_meta import EngineMismatchError, meta_path, read_meta

    if not meta_path(Path(path)).is_file():
        return 0
    try:
        return int(read_meta(Path(path)).extra.get("threads") or 0)
    except (EngineMismatchError, TypeError, ValueError):
        return 0


def session_runner(path: Path, threads: int = 0) -> Any:
    """A batch runner `run(images) -> logits` over a session of `path`; `threads` 0 = as tuned at build."""
    session = create_session(path, threads or engine_threads(path))
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def session_logits(session: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run a session over images in batches; returns float32 logits."""
    name = session.get_inputs()[0].name
    return run_batched(lambda b: session.run(None, {name: b})[0], np.ascontiguousarray(images, np.float32), batch_size)


def optimize_onnx(src: Path, dst: Path, opt_level: OptLevel = "extended", threads: int = 0) -> Path:
    """Save ORT's graph-optimised version of `src` to `dst` (atomically)."""
    import onnxruntime as ort

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".ort-") as tmp:
        tmp_path = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(
            str(src), session_options(threads, opt_level, tmp_path), providers=["CPUExecutionProvider"]
        )
        atomic_copy(tmp_path, dst)
    return dst


class _ArrayReader:
    """Feeds calibration images to the ORT quantizer in batches (a `CalibrationDataReader`)."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 32) -> None:
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self._batches = iter([{input_name: np.ascontiguousarray(b, np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # part of the CalibrationDataReader protocol; calibration reads once
        pass


def select_excluded_nodes(model: Any, settings: QuantSettings) -> list[str]:
    """Names of nodes to leave in float, found by graph structure (so they hold for either exporter).

    - `weights_only`: MatMuls whose inputs are both activations (attention scores and A·V).
    - `head`: the MatMul/Gemm nearest the graph output.
    - `patch_embed`: Conv nodes (the patch embedding of a ViT).
    """
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    consts = inits | {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    excluded: list[str] = []
    if settings.weights_only:
        excluded += [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]
    if "patch_embed" in settings.exclude:
        excluded += [n.name for n in graph.node if n.op_type == "Conv"]
    if "head" in settings.exclude:
        head = _node_nearest_output(graph, {"MatMul", "Gemm"}, consts)
        if head:
            excluded.append(head)
    return excluded


def _node_nearest_output(graph: Any, op_types: set[str], consts: set[str]) -> str | None:
    producers = {out: n for n in graph.node for out in n.output}
    frontier = [o.name for o in graph.output]
    seen: set[str] = set()
    while frontier:
        tensor = frontier.pop(0)
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in op_types and any(i in consts for i in node.input):
            return node.name
        frontier += [i for i in node.input if i not in consts]
    return None


def quantize_onnx(src: Path, dst: Path, settings: QuantSettings, calibration: np.ndarray | None = None) -> Path:
    """Quantize an FP32 ONNX model to INT8 and write it to `dst` atomically.

    Args:
        src: FP32 ONNX file (as exported).
        dst: INT8 ONNX file to write.
        settings: what and how to quantize.
        calibration: preprocessed validation images `N, C, H, W` (required for static mode).

    Raises:
        ValueError: static mode without calibration images.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if settings.mode == "static" and (calibration is None or len(calibration) == 0):
        raise ValueError("static INT8 quantization needs calibration images (the validation split)")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp, _quiet_root_logger():
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        model = onnx.load(str(pre))
        excluded = select_excluded_nodes(model, settings)
        extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": settings.activation_symmetric}
        if not settings.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = list(settings.op_types)
        if settings.mode == "static":
            methods = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }
            quantize_static(
                str(pre),
                str(out),
                _ArrayReader(model.graph.input[0].name, calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(settings.op_types),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=QuantType.QInt8 if settings.activation_symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=methods[settings.calibrate_method],
                extra_options=extra,
            )
        else:
            quantize_dynamic(
                str(pre),
                str(out),
                op_types_to_quantize=[t for t in settings.op_types if t != "Conv"],  # ConvInteger is slow on CPU
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                extra_options={"WeightSymmetric": True},
            )
        atomic_copy(out, dst)
    log.info("quantized %s -> %s (%s, %d nodes left in float)", src, dst, settings.mode, len(excluded))
    return dst


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The ORT quantizer logs one INFO line per tensor through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def build_ort_engine(
    onnx_path: Path,
    out: Path,
    images: np.ndarray,
    reference: np.ndarray,
    precision: Literal["fp32", "int8"] = "fp32",
    quant: QuantSettings | None = None,
    threads: int = 0,
    min_top1_agreement: float = 0.99,
    max_abs_diff: float | None = None,
    calibration: np.ndarray | None = None,
) -> tuple[Path, ParityReport]:
    """Build one ONNX Runtime engine, hold it to the parity gate, then publish it with its metadata.

    Args:
        onnx_path: the exported FP32 model.
        out: engine file to write (`.onnx`); `out.json` gets its metadata.
        images: parity images (validation split), preprocessed `N, C, H, W` float32.
        reference: PyTorch FP32 logits of `images`.
        precision: `fp32` (graph-optimised) or `int8` (quantized with `quant`).
        quant: quantization settings for `int8`.
        threads: intra-op threads for serving; 0 = tune: time batch-1 latency on 1, 2, 4 ... physical cores
            and record the fastest in the engine metadata, where `vitops bench` and `ort_runner` find it.
        min_top1_agreement: parity threshold.
        max_abs_diff: parity threshold on logits (FP32 only; None to skip).
        calibration: images for static calibration (defaults to `images`).

    Raises:
        ParityError: the engine disagrees with PyTorch; nothing is written and an older engine stays.
    """
    import onnxruntime as ort

    from vitops.deploy.timing import thread_candidates, tune_threads

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quant = quant or QuantSettings()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".engine-") as tmp:
        candidate = Path(tmp) / out.name
        if precision == "fp32":
            optimize_onnx(onnx_path, candidate, "extended", threads)
            label = "onnxruntime-fp32"
        else:
            quantize_onnx(onnx_path, candidate, quant, images if calibration is None else calibration)
            label = f"onnxruntime-int8-{quant.mode}"
        logits = session_logits(create_session(candidate, threads), images)
        report = require_parity(compare_logits(reference, logits, label, min_top1_agreement, max_abs_diff))
        serving = {"threads": threads, "thread_p50_ms": None}
        if not threads:
            candidates = thread_candidates(physical_cores())
            best, p50 = tune_threads(lambda n: session_runner(candidate, n), images[:1], candidates)
            serving = {"threads": best, "thread_p50_ms": {str(n): round(ms, 4) for n, ms in p50.items()}}
            log.info("%s: batch-1 p50 by threads %s ms; serving with %d", label, serving["thread_p50_ms"], best)
        meta = EngineMeta(
            target="onnxruntime",
            precision="fp32" if precision == "fp32" else f"int8-{quant.mode}",
            onnx_sha256=sha256_file(onnx_path),
            runtime_version=ort.__version__,
            device=cpu_name(),
            vitops_version=vitops_version(),
            created=utc_now(),
            extra={
                "parity": report.as_dict(),
                "quantization": asdict(quant) if precision == "int8" else None,
                **serving,
            },
        )
        atomic_copy(candidate, out)
        write_meta(out, meta)
    log.info("%s", report.describe())
    return out, report
