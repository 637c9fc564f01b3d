"""OpenVINO CPU engines: FP32 and BF16 from `openvino.convert_model`, INT8 through NNCF post-training quantization.

An OpenVINO engine is an OpenVINO IR (`model.xml` + `model.bin`, FP32 weights: `compress_to_fp16=False`) packed
into one uncompressed zip, so that it is published with one atomic rename like every other engine and travels
to the registry as one file (`unzip` gives the IR back for `benchmark_app`). The precision it runs at is set
when it is compiled, always explicitly: `INFERENCE_PRECISION_HINT` `f32` or `bf16`. Left unset, the CPU plugin
picks BF16 by itself on CPUs with native BF16 (AMX, AVX-512 BF16), so an "FP32" engine would silently not
be one. INT8 is NNCF's post-training quantization with its transformer preset (`ModelType.TRANSFORMER`:
SmoothQuant, attention scores and LayerNorm kept in float) calibrated on validation images; what it leaves in
float runs at FP32.

Which precisions this CPU runs fast is read from the plugin's `OPTIMIZATION_CAPABILITIES` (`BF16` only on CPUs
with native BF16); asked for BF16 where it is missing, the plugin would quietly run FP32, so the build refuses
instead. An engine is tied to the OpenVINO version, CPU and instruction set that built it (its metadata says
which, and `load_ov_engine` refuses any other). Thread counts are tuned at build, as for ONNX Runtime.

Telemetry: `import openvino`, its model converter and NNCF send usage data unless the user opted out with
`opt_in_out --opt_out` (a file in ~/intel) or a CI variable is set; they read no variable of their own. With
`DO_NOT_TRACK` set (the offline defaults of the Makefile, the tests and prefect.yaml set it), vitops hides the
`openvino_telemetry` module before openvino is imported, and both fall back to their built-in no-op stubs.

The openvino and nncf calls sit in `_convert`, `_quantize`, `_save_ir`, `_compile` and `ov_status`; every
decision around them is a plain function.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vitops.common.files import atomic_copy, sha256_file, utc_now
from vitops.deploy.engine_meta import EngineMeta, check_compatible, read_meta, vitops_version, write_meta
from vitops.deploy.parity import ParityReport, compare_logits, require_parity, run_batched

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8")
XML, WEIGHTS = "model.xml", "model.bin"  # member names inside the engine zip
# /proc/cpuinfo flag -> the name used in metadata and tables: what decides which kernels the CPU plugin runs.
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)


class OpenVINOUnavailable(RuntimeError):
    """OpenVINO (or the asked precision) cannot run on this machine; the message says why and what to use."""


@dataclass
class OvPlan:
    """What to build: the precision, the inference precision hint it compiles with, and why (for the metadata)."""

    precision: Precision
    hint: Literal["f32", "bf16"]
    note: str = ""


def telemetry_off() -> bool:
    """Hide `openvino_telemetry` from this process when `DO_NOT_TRACK` is set; whether telemetry is now off.

    Must run before openvino is first imported: `import openvino` itself records a client id in ~/intel.
    OpenVINO's converter and NNCF catch the ImportError and use their no-op stubs.
    """
    if os.environ.get("DO_NOT_TRACK", "").lower() in ("", "0", "false", "no"):
        return False
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # `import` now raises ImportError
    return sys.modules["openvino_telemetry"] is None


def import_openvino() -> Any:
    """The openvino module, telemetry off first (see `telemetry_off`).

    Raises:
        OpenVINOUnavailable: the package is not installed.
    """
    telemetry_off()
    try:
        import openvino
    except ImportError as err:
        raise OpenVINOUnavailable(f"the openvino package is not installed ({err}); pip install openvino") from err
    return openvino


def cpu_isa(flags: Iterable[str]) -> list[str]:
    """The instruction sets among `flags` (of /proc/cpuinfo) that the CPU plugin's kernels depend on."""
    present = set(flags)
    return [label for flag, label in ISA_FLAGS if flag in present]


def cpu_flags() -> list[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def precision_support(capabilities: Iterable[str], isa: Iterable[str]) -> dict[str, str]:
    """Precision -> "" where this CPU runs it fast, else why not.

    Args:
        capabilities: the CPU plugin's `OPTIMIZATION_CAPABILITIES` (`FP32`, `BF16`, `INT8`, ...).
        isa: from `cpu_isa`, named in the reasons.
    """
    caps, isa = set(capabilities), list(isa)
    have = ", ".join(isa) or "no AVX2"
    support = {"fp32": ""}
    support["bf16"] = (
        ""
        if "BF16" in caps
        else f"this CPU has no native BF16 (OpenVINO CPU capabilities {sorted(caps)}; ISA {have}): "
        "the plugin would run FP32 instead; BF16 needs AMX-BF16 or AVX-512 BF16 (Sapphire Rapids or newer)"
    )
    support["int8"] = "" if "INT8" in caps else f"the CPU plugin reports no INT8 here (capabilities {sorted(caps)})"
    return support


def make_plan(precision: Precision, support: dict[str, str]) -> OvPlan:
    """The build plan for one precision, always with an explicit inference precision hint.

    Raises:
        OpenVINOUnavailable: the CPU does not run that precision natively (the plugin would fall back quietly).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if support.get(precision):
        raise OpenVINOUnavailable(f"OpenVINO {precision.upper()} cannot run here: {support[precision]}")
    if precision == "bf16":
        return OvPlan("bf16", "bf16", "BF16 matmuls and activations (AMX / AVX-512 BF16), FP32 accumulation")
    if precision == "int8":
        return OvPlan("int8", "f32", "NNCF INT8 (transformer preset); the parts left in float run at FP32")
    return OvPlan("fp32", "f32", "FP32 throughout (the hint stops the plugin from choosing BF16 on AMX CPUs)")


def compile_config(hint: str, threads: int) -> dict[str, Any]:
    """CPU plugin properties: the explicit precision hint, one stream (a batch-1 latency engine), `threads`
    inference threads (0: the plugin's default, one per physical core)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def runtime_meta() -> EngineMeta:
    """This machine's OpenVINO version, CPU name and ISA, for metadata and compatibility checks."""
    runtime, capabilities = ov_status()
    isa = cpu_isa(cpu_flags())
    return EngineMeta(
        target="openvino",
        precision="",
        onnx_sha256="",
        runtime_version=runtime["version"],
        device=runtime["cpu"],
        extra={"isa": isa, "capabilities": capabilities},
    )


def build_ov_engine(
    onnx_path: Path,
    out: Path,
    images: np.ndarray,
    reference: np.ndarray,
    plan: OvPlan,
    threads: int = 0,
    min_top1_agreement: float = 0.99,
    max_abs_diff: float | None = None,
    calibration: np.ndarray | None = None,
    runtime: EngineMeta | None = None,
) -> tuple[Path, ParityReport]:
    """Build one OpenVINO engine, hold it to the parity gate, then publish it with its metadata.

    Args:
        onnx_path: the exported FP32 model.
        out: engine file to write (`<precision>.zip`); `out.json` gets its metadata.
        images: parity images (validation split), preprocessed `N, C, H, W` float32.
        reference: PyTorch FP32 logits of `images`.
        plan: from `make_plan`.
        threads: inference threads for serving; 0 = tune: time batch-1 latency on 1, 2, 4 ... physical cores
            and record the fastest in the metadata.
        min_top1_agreement: parity threshold.
        max_abs_diff: parity threshold on logits (FP32 only; None to skip).
        calibration: INT8 calibration images (default: `images`).
        runtime: this machine (default: `runtime_meta()`).

    Raises:
        ParityError: the engine disagrees with PyTorch; nothing is written and an older engine stays.
    """
    from vitops.deploy.onnxrt import physical_cores
    from vitops.deploy.timing import thread_candidates, tune_threads

    runtime = runtime or runtime_meta()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    label = f"openvino-{plan.precision}"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".engine-") as tmp:
        model = _convert(onnx_path)
        if plan.precision == "int8":
            model = _quantize(model, images if calibration is None else calibration)
        candidate = Path(tmp) / out.name
        pack_ir(_save_ir(model, Path(tmp) / "ir"), candidate)
        compiled, used = _compile(candidate, compile_config(plan.hint, threads))
        logits = run_batched(_request_runner(compiled), np.ascontiguousarray(images, np.float32), 64)
        report = require_parity(compare_logits(reference, logits, label, min_top1_agreement, max_abs_diff))
        serving: dict[str, Any] = {"threads": threads, "thread_p50_ms": None}
        if not threads:
            runners = lambda n: _request_runner(_compile(candidate, compile_config(plan.hint, n))[0])  # noqa: E731
            best, p50 = tune_threads(runners, images[:1], thread_candidates(physical_cores()))
            serving = {"threads": best, "thread_p50_ms": {str(n): round(ms, 4) for n, ms in p50.items()}}
            log.info("%s: batch-1 p50 by threads %s ms; serving with %d", label, serving["thread_p50_ms"], best)
        meta = EngineMeta(
            target="openvino",
            precision=plan.precision,
            onnx_sha256=sha256_file(onnx_path),
            runtime_version=runtime.runtime_version,
            device=runtime.device,
            vitops_version=vitops_version(),
            created=utc_now(),
            extra={
                "isa": runtime.extra.get("isa", []),
                "capabilities": runtime.extra.get("capabilities", []),
                "inference_precision_hint": plan.hint,
                "inference_precision": used.get("INFERENCE_PRECISION_HINT", ""),
                "streams": 1,
                "note": plan.note,
                "quantization": {"tool": "nncf", "model_type": "transformer", "images": len(images)}
                if plan.precision == "int8"
                else None,
                "parity": report.as_dict(),
                **serving,
            },
        )
        atomic_copy(candidate, out)
        write_meta(out, meta)
    log.info("%s", report.describe())
    return out, report


def load_ov_engine(path: Path, threads: int = 0, runtime: EngineMeta | None = None) -> Callable[[np.ndarray], Any]:
    """Check an engine's metadata against this machine, then compile it as `run(images) -> logits`.

    Args:
        path: the engine zip.
        threads: 0 = as tuned at build.
        runtime: this machine (default: `runtime_meta()`).

    Raises:
        EngineMismatchError: built for another OpenVINO version, CPU or ISA; nothing is loaded.
    """
    meta = read_meta(path)
    check_compatible(meta, runtime or runtime_meta(), path)
    hint = meta.extra.get("inference_precision_hint") or "f32"
    compiled, _ = _compile(Path(path), compile_config(hint, threads or int(meta.extra.get("threads") or 0)))
    return _request_runner(compiled)


def pack_ir(xml: Path, out: Path) -> Path:
    """Pack an IR (`xml` and the `.bin` beside it) into one uncompressed zip at `out`."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(xml, XML)
        zf.write(xml.with_suffix(".bin"), WEIGHTS)
    return out


def read_ir(path: Path) -> tuple[bytes, bytes]:
    """The IR's XML and weights from an engine zip."""
    with zipfile.ZipFile(path) as zf:
        return zf.read(XML), zf.read(WEIGHTS)


def _request_runner(compiled: Any) -> Callable[[np.ndarray], np.ndarray]:
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(images, np.float32)})
        return request.get_output_tensor(0).data.copy()

    return run


# --- the openvino and nncf calls -------------------------------------------------------------------


def ov_status() -> tuple[dict[str, str], list[str]]:
    """OpenVINO's version and CPU name, and the CPU plugin's `OPTIMIZATION_CAPABILITIES`."""
    ov = import_openvino()
    core = ov.Core()
    caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    return {"version": ov.get_version(), "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME"))}, caps


def _convert(onnx_path: Path) -> Any:
    return import_openvino().convert_model(str(onnx_path))


def _quantize(model: Any, calibration: np.ndarray) -> Any:
    """NNCF post-training INT8 with the transformer preset, calibrated on `calibration` (batch 1 each)."""
    import_openvino()
    import nncf

    nncf.set_log_level(logging.ERROR)  # its progress bars and INFO lines, once per layer group
    images = np.ascontiguousarray(calibration, np.float32)
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars; a build prints its results
        return nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(images),
        )


def _save_ir(model: Any, stem: Path) -> Path:
    xml = stem.with_suffix(".xml")
    import_openvino().save_model(model, str(xml), compress_to_fp16=False)
    return xml


def _compile(path: Path, config: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """Compile an engine zip on the CPU; returns it and the properties the plugin settled on."""
    ov = import_openvino()
    xml, weights = read_ir(path)
    core = ov.Core()
    model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
    compiled = core.compile_model(model, "CPU", config)
    used = {}
    for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS"):
        value = compiled.get_property(key)
        used[key] = value.to_string() if hasattr(value, "to_string") else str(value)  # ov.Type -> "f32", "bf16"
    return compiled, used
