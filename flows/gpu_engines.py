"""The GPU engines of the engine stage: TensorRT and torch-aot, each behind its parity gate.

    build_gpu(target, inputs, onnx_path, export_params, engine_params, precision, trt_available)
        -> [(backend, engine, parity)], {backend: why it was left out}

`tensorrt` and `torch-aot` build their one engine and stop at the first gate that says no; `gpu` (`--target auto`
on a CUDA machine) builds TensorRT where it can and torch-aot, leaves out (and names) one that fails or cannot run,
and fails only when neither passed. `flows/engines.py` times the ones kept and serves the fastest that agrees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitops.deploy.engine_meta import engine_files
from vitops.flows.config import EngineParams, ExportParams

log = logging.getLogger(__name__)

Built = tuple[str, Path, dict[str, Any]]  # backend, engine file, parity report


@dataclass(frozen=True)
class GateImages:
    """What every gate of one build compares: the FP32 model, its parity and calibration images (float32 N, C, H,
    W) and its logits on the parity images."""

    model: Any
    parity: Any
    calibration: Any
    reference: Any


def build_gpu(
    target: str,
    inputs: GateImages,
    onnx_path: Path,
    x: ExportParams,
    e: EngineParams,
    precision: str | None = None,
    trt_available: bool = False,
) -> tuple[list[Built], dict[str, str]]:
    """Build the engines of `target` (`tensorrt`, `torch-aot` or `gpu`: both); returns those kept and, for `gpu`, why
    each other one was left out.

    Raises:
        ParityError: an explicit target's gate said no, or for `gpu` no engine passed.
    """
    from vitops.deploy.parity import ParityError
    from vitops.deploy.tensorrt import TensorRTBuildError
    from vitops.deploy.torch_aot import AotUnavailable

    jobs = []
    if target in ("tensorrt", "gpu") and (trt_available or target == "tensorrt"):
        trt_precision = precision if precision in ("fp16", "int8", "fp32") else e.trt_precision
        jobs.append((f"tensorrt-{trt_precision}", lambda: build_tensorrt(inputs, onnx_path, x, e, trt_precision)))
    if target in ("torch-aot", "gpu"):
        aot_precision = precision if precision in ("fp16", "bf16", "fp32") else e.aot_precision
        label = "torch-aot" if aot_precision == "auto" else f"torch-aot-{aot_precision}"
        jobs.append((label, lambda: build_torch_aot(inputs, onnx_path, x, e, aot_precision)))
    built: list[Built] = []
    skipped: dict[str, str] = {}
    for backend, job in jobs:
        try:
            built.append(job())
        except (ParityError, TensorRTBuildError, AotUnavailable) as err:
            if target != "gpu":
                raise
            log.warning("%s left out: %s", backend, err)
            skipped[backend] = str(err)
    if not built:
        raise ParityError(f"no GPU engine passed its gate: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
    return built, skipped


def build_torch_aot(inputs: GateImages, onnx_path: Path, x: ExportParams, e: EngineParams, precision: str) -> Built:
    """The torch-aot engine of `precision` (`auto`: FP16 on CUDA, FP32 on the CPU) for `engine.aot_device`; FP32 is
    held to the export's gate (max |logit diff| and agreement), FP16 and BF16 to the reduced-precision floor."""
    from vitops.common.files import sha256_file
    from vitops.deploy.torch_aot import build_aot_engine, make_plan

    chw = tuple(int(d) for d in inputs.parity.shape[1:])
    plan = make_plan(precision, e.aot_device, chw, e.aot_max_batch, e.aot_fallback)  # type: ignore[arg-type]
    fp32 = plan.precision == "fp32"
    path, report = build_aot_engine(
        inputs.model,
        engine_files(e.out_dir)[f"torch-aot-{plan.precision}"],
        inputs.parity,
        inputs.reference,
        plan,
        min_top1_agreement=x.min_top1_agreement if fp32 else e.min_int8_top1_agreement,
        max_abs_diff=x.max_abs_diff if fp32 else None,
        onnx_sha256=sha256_file(onnx_path),
    )
    return f"torch-aot-{plan.precision}", path, report.as_dict()


def build_tensorrt(inputs: GateImages, onnx_path: Path, x: ExportParams, e: EngineParams, precision: str) -> Built:
    """The TensorRT engine of `precision`, built from the ONNX export (INT8: its symmetric Q/DQ version calibrated on
    validation images), published only after its parity gate."""
    import torch

    from vitops.deploy.engine_meta import meta_path
    from vitops.deploy.onnxrt import QuantSettings, quantize_onnx
    from vitops.deploy.parity import compare_logits, require_parity
    from vitops.deploy.tensorrt import build_trt_engine, load_trt_engine, make_plan, runtime_meta

    runtime = runtime_meta()
    parity = inputs.parity
    source = onnx_path
    if precision == "int8":
        # Explicit quantization: symmetric INT8 Q/DQ calibrated on validation images, built by TensorRT.
        source = Path(e.out_dir) / "tensorrt" / "model_qdq.onnx"
        quant = QuantSettings(mode="static", activation_symmetric=True, calibrate_method=e.quant_calibration)
        quantize_onnx(onnx_path, source, quant, inputs.calibration)
    plan = make_plan(
        source,
        precision,
        {"min": e.trt_min_batch, "opt": e.trt_opt_batch, "max": e.trt_max_batch},
        runtime.compute_capability,
        e.trt_workspace_gib,
    )
    out = Path(e.out_dir) / "tensorrt" / f"{plan.precision}.engine"
    staged = out.with_name(f".{out.name}.candidate")
    try:
        build_trt_engine(source, staged, plan, e.trt_timing_cache, runtime)
        run = load_trt_engine(staged, runtime)
        step = e.trt_max_batch
        chunks = [run(torch.from_numpy(parity[i : i + step])).float().cpu() for i in range(0, len(parity), step)]
        floor = e.min_int8_top1_agreement if plan.precision == "int8" else x.min_top1_agreement
        report = require_parity(
            compare_logits(inputs.reference, torch.cat(chunks).numpy(), f"tensorrt-{plan.precision}", floor)
        )
        meta_path(staged).replace(meta_path(out))  # publish: both renames are atomic
        staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
        meta_path(staged).unlink(missing_ok=True)
    log.info("wrote %s (%s, TensorRT %s)", out, runtime.device, runtime.runtime_version)
    return f"tensorrt-{plan.precision}", out, report.as_dict()
