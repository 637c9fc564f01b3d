"""TensorRT engines for NVIDIA GPUs (TensorRT 10 and 11), built from the exported ONNX file with its Python API.

Networks are strongly typed: the precision is written into the ONNX graph before TensorRT parses it
(`deploy.onnx_fp16.to_fp16`: FP16 everywhere except LayerNorm, softmax and the reductions, which ViTs lose
accuracy on in FP16, and Q/DQ), and TensorRT keeps every tensor at the type the graph gives it. One code path
serves TensorRT 10 and 11: 11 dropped the FP16, INT8 and OBEY_PRECISION_CONSTRAINTS builder flags (and per-layer
precision pins) that weakly typed builds needed, and 10 builds strongly typed networks the same way.

Everything that decides what to build is a plain function tested on any machine: which target to build
(`choose_target`), which precision the GPU supports (`choose_precision`), the typed ONNX graph, the optimization
profile shapes, metadata, compatibility checks, the timing cache and the atomic write. The tensorrt calls
themselves are few and sit in `_trt_build` and `_trt_runner` only.

INT8 uses explicit quantization: the ONNX model is first quantized to symmetric QDQ with ONNX Runtime's
calibrator on validation images (the same code as the CPU engine, `deploy.onnxrt.quantize_onnx`), then typed
FP16 around its Q/DQ nodes, and TensorRT builds from them. Implicit INT8 calibrators (IInt8EntropyCalibrator2)
are deprecated in TensorRT 10 and gone in 11, so they are not used.

Verified on hardware: none yet (no TensorRT wheel installs in this workplace); the plain functions around the
tensorrt calls, the typed graphs included (run in ONNX Runtime), are unit-tested on CPU.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vitops.common.files import atomic_write_bytes, sha256_file, utc_now
from vitops.deploy.engine_meta import (
    EngineMeta,
    check_compatible,
    load_timing_cache,
    read_meta,
    save_timing_cache,
    vitops_version,
    write_meta,
)

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
Target = Literal["auto", "onnxruntime", "openvino", "tensorrt", "torch-aot"]


class TensorRTUnavailable(RuntimeError):
    """TensorRT was asked for explicitly but cannot run here (no CUDA device or no tensorrt package)."""


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build an engine; the message has its errors."""


@dataclass
class TrtPlan:
    """What to build.

    Attributes:
        precision: `fp32`, `fp16` (with FP32 LayerNorm/softmax) or `int8` (from an explicit Q/DQ model, FP16
            around it), written into the ONNX graph (`typed_onnx`).
        input_name: the network input.
        input_chw: channels, height, width of one image.
        profile: batch sizes `{"min", "opt", "max"}` of the optimization profile.
        workspace_gib: builder workspace memory limit.
        extra: notes recorded in the metadata.
    """

    precision: Precision
    input_name: str
    input_chw: tuple[int, int, int]
    profile: dict[str, int]
    workspace_gib: float = 4.0
    extra: dict[str, Any] = field(default_factory=dict)


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT can build here, and why not."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device"
    except ImportError:
        return False, "torch is missing"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'vitops[tensorrt]')"
    return True, ""


def choose_target(requested: Target, available: bool, reason: str = "", cuda: bool = False) -> tuple[str, str]:
    """Pick the engine target.

    Args:
        requested: `auto`, `onnxruntime`, `openvino`, `tensorrt` or `torch-aot`.
        available: whether TensorRT can build here (see `tensorrt_status`).
        reason: why it cannot.
        cuda: whether torch sees a CUDA device (torch-aot builds wherever it does).

    Returns:
        The target (`auto` becomes `gpu` with CUDA: TensorRT where it can build, and torch-aot; else `cpu`: every CPU
        engine; the fastest that agrees is served) and a message for the user (empty when nothing to say).

    Raises:
        TensorRTUnavailable: when `tensorrt` was asked for explicitly and cannot run.
    """
    if requested in ("onnxruntime", "openvino", "torch-aot"):
        return requested, ""
    if requested == "tensorrt":
        if available:
            return "tensorrt", ""
        raise TensorRTUnavailable(
            f"TensorRT was requested but cannot run here: {reason}. Build on an NVIDIA GPU machine with "
            "`pip install 'vitops[tensorrt]'`, or use --target torch-aot, onnxruntime, openvino (or auto)."
        )
    if available or cuda:
        return "gpu", "" if available else f"TensorRT skipped ({reason}); building the torch-aot engine"
    return "cpu", f"TensorRT skipped ({reason}); building the CPU engines (ONNX Runtime, OpenVINO) instead"


def choose_precision(requested: Precision, compute_capability: str) -> tuple[Precision, str]:
    """The precision the GPU runs fast, falling back from INT8 to FP16 to FP32, with a note when it does.

    FP16 is fast from compute capability 7.0 (and on 6.0/6.2); INT8 needs 6.1 or newer.
    """
    major, minor = (int(p) for p in compute_capability.split(".")[:2])
    cc = (major, minor)
    fast_fp16 = cc >= (7, 0) or cc in ((6, 0), (6, 2))
    fast_int8 = cc >= (6, 1)
    if requested == "int8" and not fast_int8:
        requested, note = "fp16", f"INT8 is not fast on compute capability {compute_capability}; using FP16"
        if fast_fp16:
            return requested, note
    if requested == "fp16" and not fast_fp16:
        return "fp32", f"FP16 is not fast on compute capability {compute_capability}; using FP32"
    return requested, ""


def profile_shapes(chw: Sequence[int], profile: dict[str, int]) -> tuple[tuple[int, ...], ...]:
    """Min, opt and max input shapes of the optimization profile.

    Raises:
        ValueError: unless 1 <= min <= opt <= max.
    """
    lo, opt, hi = profile["min"], profile["opt"], profile["max"]
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"optimization profile needs 1 <= min <= opt <= max batch, got {lo}/{opt}/{hi}")
    return tuple((b, *chw) for b in (lo, opt, hi))


def typed_onnx(onnx_path: Path, precision: Precision, folder: Path) -> tuple[Path, list[str]]:
    """The ONNX graph TensorRT builds a strongly typed network from: `onnx_path` itself for FP32, else its FP16
    version written into `folder` (`deploy.onnx_fp16.write_fp16`); returns it and the nodes kept in FP32."""
    if precision == "fp32":
        return Path(onnx_path), []
    from vitops.deploy.onnx_fp16 import write_fp16

    return write_fp16(Path(onnx_path), Path(folder) / f"{precision}.onnx")


def make_plan(
    onnx_path: Path,
    precision: Precision,
    profile: dict[str, int],
    compute_capability: str,
    workspace_gib: float = 4.0,
) -> TrtPlan:
    """Everything the build needs, decided from the ONNX file, the request and the GPU."""
    import onnx

    graph_input = onnx.load(str(onnx_path), load_external_data=False).graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    chosen, note = choose_precision(precision, compute_capability)
    if note:
        log.warning("%s", note)
    profile_shapes(dims[1:], profile)  # validates the order
    return TrtPlan(
        precision=chosen,
        input_name=graph_input.name,
        input_chw=(dims[1], dims[2], dims[3]),
        profile=dict(profile),
        workspace_gib=workspace_gib,
        extra={"requested_precision": precision, "note": note},
    )


def runtime_meta() -> EngineMeta:
    """The TensorRT version and GPU of this machine, for metadata and compatibility checks."""
    import tensorrt as trt
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return EngineMeta(
        target="tensorrt",
        precision="",
        onnx_sha256="",
        runtime_version=trt.__version__,
        device=props.name,
        compute_capability=f"{props.major}.{props.minor}",
    )


def build_trt_engine(
    onnx_path: Path, out: Path, plan: TrtPlan, timing_cache: Path, runtime: EngineMeta | None = None
) -> EngineMeta:
    """Build a TensorRT engine and publish it atomically with its metadata; the timing cache is reused.

    Args:
        onnx_path: FP32 ONNX (fp32/fp16) or its symmetric Q/DQ version (int8); typed to the plan's precision here.
        out: engine file (`.engine`); `out.json` gets the metadata.
        plan: from `make_plan`.
        timing_cache: loaded before the build (if present) and saved back after it.
        runtime: this machine's TensorRT version and GPU (default: `runtime_meta()`).

    An exception or Ctrl-C during the build or the write leaves an older engine intact and no partial file.
    """
    runtime = runtime or runtime_meta()
    cache_in = load_timing_cache(timing_cache)
    log.info(
        "building TensorRT %s engine (%s, profile %s, timing cache %s)",
        plan.precision,
        runtime.device,
        plan.profile,
        "reused" if cache_in else "new",
    )
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".trt-") as tmp:
        typed, fp32_nodes = typed_onnx(onnx_path, plan.precision, Path(tmp))
        engine, cache_out = _trt_build(typed, plan, cache_in)
    atomic_write_bytes(Path(out), _chunks(engine))
    save_timing_cache(timing_cache, cache_out)
    meta = EngineMeta(
        target="tensorrt",
        precision=plan.precision,
        onnx_sha256=sha256_file(onnx_path),
        runtime_version=runtime.runtime_version,
        device=runtime.device,
        compute_capability=runtime.compute_capability,
        profile=dict(plan.profile),
        vitops_version=vitops_version(),
        created=utc_now(),
        extra={
            **plan.extra,
            "strongly_typed": True,
            "fp32_nodes": len(fp32_nodes),
            "timing_cache_reused": bool(cache_in),
        },
    )
    write_meta(Path(out), meta)
    return meta


def load_trt_engine(path: Path, runtime: EngineMeta | None = None) -> Any:
    """Check an engine's metadata against this machine, then load it as a callable `run(torch.Tensor)`.

    Raises:
        EngineMismatchError: built for another TensorRT version or GPU; nothing is loaded.
    """
    meta = read_meta(path)
    check_compatible(meta, runtime or runtime_meta(), path)
    return _trt_runner(Path(path).read_bytes())


def _chunks(data: Any, size: int = 16 << 20) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


# --- the tensorrt calls ----------------------------------------------------------------------------


def _trt_build(onnx_path: Path, plan: TrtPlan, timing_cache: bytes) -> tuple[bytes, bytes]:
    """Parse a typed ONNX graph into a strongly typed network and build it; returns the serialized engine and the
    timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: every tensor keeps the ONNX graph's type (TensorRT 10 and 11; explicit batch is implied).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, *profile_shapes(plan.input_chw, plan.profile))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT build failed (see the TensorRT log above)")
    return bytes(memoryview(serialized)), bytes(memoryview(cache.serialize()))


def _trt_runner(engine_bytes: bytes) -> Any:
    """Deserialize an engine; returns `run(x: torch.Tensor) -> torch.Tensor` on the current CUDA stream."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise TensorRTBuildError("TensorRT could not deserialize the engine; rebuild it with `vitops build`")
    context = engine.create_execution_context()
    in_name, out_name = engine.get_tensor_name(0), engine.get_tensor_name(1)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to("cuda", torch.float32).contiguous()
        context.set_input_shape(in_name, tuple(x.shape))
        out = torch.empty(tuple(context.get_tensor_shape(out_name)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(in_name, x.data_ptr())
        context.set_tensor_address(out_name, out.data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out

    run.engine = engine  # keep the engine alive as long as the runner
    return run
