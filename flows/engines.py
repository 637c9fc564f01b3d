"""The engine stage: ONNX export and the engines of the target, each behind its parity gate.

    export(model_dir, dataset, out, export_params)         ONNX + parity gate                  -> ExportResult
    build(model_dir, dataset, export_params, engine_params) engines for the target + parity gates -> BuildResult

`auto` on a CUDA machine builds the GPU engines (TensorRT where it is installed, and torch-aot: see
`flows/gpu_engines.py`), elsewhere every CPU engine this CPU runs (ONNX Runtime FP32/INT8, OpenVINO
FP32/BF16/INT8): one that fails its gate or cannot run here is left out and named, the others are timed at
batch 1 and the fastest that agrees enough is chosen (`selection.json`). An explicit target builds its own
engines and stops at the first gate that says no (`deploy.parity.ParityError`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.deploy.engine_meta import engine_files
from vitops.flows.config import EngineParams, ExportParams
from vitops.flows.settings import Dataset

log = logging.getLogger(__name__)


class EngineInputError(ValueError):
    """Inputs for an engine stage are missing (no validation images, no engines to bench)."""


@dataclass
class ExportResult:
    path: Path
    exporter: str
    opset: int
    parity: dict[str, Any]
    reused: bool = False


@dataclass
class BuildResult:
    target: str  # tensorrt | torch-aot | onnxruntime | openvino | gpu (auto with CUDA) | cpu (auto without)
    engines: list[Path]
    parity: dict[str, dict[str, Any]]
    onnx: ExportResult
    notice: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was not built or kept
    selection: dict[str, Any] | None = None  # deploy.selection.Selection: the engine to serve with, and why
    engine_dir: Path = Path("artifacts/engines")


def validation_images(dataset: Dataset, meta: Any, limit: int) -> Any:
    """Preprocessed validation images (a float tensor N, C, H, W) for parity gates and INT8 calibration."""
    from vitops.vit.data import load_split_tensors

    if not dataset.manifest.is_file():
        raise EngineInputError(
            f"{dataset.manifest}: no manifest; run `vitops validate` first (parity needs the val split)"
        )
    images, _ = load_split_tensors(dataset.root, dataset.rows(), meta, "val", limit=limit)
    if len(images) == 0:
        raise EngineInputError(f"{dataset.manifest}: the val split is empty; parity gates need validation images")
    return images


def export(
    model_dir: Path,
    dataset: Dataset,
    out: Path,
    export_params: ExportParams,
    ort_threads: int = 0,
    exporter: str | None = None,
) -> ExportResult:
    """Export a model folder to ONNX and hold it to the parity gate on validation images of `dataset`; a failing
    gate leaves no file."""
    from vitops.common.files import sha256_file
    from vitops.deploy.export import export_checked
    from vitops.vit.bundle import WEIGHTS_FILE, load_bundle

    x = export_params
    model, meta = load_bundle(model_dir)
    images = validation_images(dataset, meta, x.parity_images)
    result, report = export_checked(
        model,
        images,
        Path(out),
        opset=x.opset,
        exporter=exporter or x.exporter,
        max_abs_diff=x.max_abs_diff,
        min_top1_agreement=x.min_top1_agreement,
        threads=ort_threads,
        source={"model_dir": str(model_dir), "weights_sha256": sha256_file(model_dir / WEIGHTS_FILE)},
    )
    return ExportResult(path=result.path, exporter=result.exporter, opset=result.opset, parity=report.as_dict())


def onnx_is_current(onnx_path: Path, model_dir: Path, opset: int) -> bool:
    """Whether `onnx_path` was exported from these weights at the configured opset and is unchanged since."""
    from vitops.common.files import sha256_file
    from vitops.deploy.engine_meta import EngineMismatchError, read_meta
    from vitops.vit.bundle import WEIGHTS_FILE

    if not onnx_path.is_file():
        return False
    try:
        meta = read_meta(onnx_path)
    except EngineMismatchError:
        return False
    return (
        meta.extra.get("source", {}).get("weights_sha256") == sha256_file(model_dir / WEIGHTS_FILE)
        and meta.extra.get("opset") == opset
        and meta.onnx_sha256 == sha256_file(onnx_path)
    )


def build(
    model_dir: Path,
    dataset: Dataset,
    export_params: ExportParams,
    engine_params: EngineParams,
    target: str | None = None,
    precision: str | None = None,
    quantization: str | None = None,
) -> BuildResult:
    """Export when the ONNX file is missing or stale, then build the target's engines, each behind its parity
    gate on validation images of `dataset`; `auto` says what it skipped (`notice`) and chooses the fastest
    engine that agrees enough (`selection`)."""
    import torch

    from vitops.deploy.engine_meta import read_meta
    from vitops.deploy.tensorrt import choose_target, tensorrt_status

    x, e = export_params, engine_params
    requested = target or e.target
    available, reason = tensorrt_status() if requested in ("auto", "tensorrt") else (False, "")
    chosen, notice = choose_target(requested, available, reason, cuda=torch.cuda.is_available())
    _check_precision(chosen, precision)
    onnx_path = Path(x.out)
    if onnx_is_current(onnx_path, model_dir, x.opset):
        meta = read_meta(onnx_path)
        onnx = ExportResult(onnx_path, meta.extra.get("exporter", "?"), meta.extra.get("opset", 0), {}, reused=True)
    else:
        onnx = export(model_dir, dataset, onnx_path, x, e.ort_threads)
    gate = _GateInputs(model_dir, dataset, x, e)
    if chosen in ("tensorrt", "torch-aot", "gpu"):
        from vitops.deploy.parity import torch_logits
        from vitops.flows.gpu_engines import GateImages, build_gpu

        model, parity, calibration = _read_gate_inputs(gate)
        inputs = GateImages(model, parity, calibration, torch_logits(model, parity))
        built, skipped = build_gpu(chosen, inputs, onnx_path, x, e, precision, available)
        image = parity[:1]
    else:
        built, skipped, image = _build_cpu(gate, onnx_path, chosen, precision, quantization or None)
    # an explicit TensorRT build serves its one engine as before; every other build times what it kept
    selection = None if chosen == "tensorrt" else _select(e, onnx_path, built, skipped, image)
    return BuildResult(
        target=chosen,
        engines=[p for _, p, _ in built],
        parity={str(p): r for _, p, r in built},
        onnx=onnx,
        notice=notice,
        skipped=skipped,
        selection=selection,
        engine_dir=Path(e.out_dir),
    )


@dataclass(frozen=True)
class _GateInputs:
    """What every parity gate of one build reads: the model, its validation images and the settings."""

    model_dir: Path
    dataset: Dataset
    x: ExportParams
    e: EngineParams


def _check_precision(target: str, precision: str | None) -> None:
    """`--precision` names a precision of the target's engines (fp16 is TensorRT's and torch-aot's, bf16 OpenVINO's
    and torch-aot's)."""
    allowed = {
        "tensorrt": ("fp16", "int8", "fp32"),
        "openvino": ("fp32", "bf16", "int8"),
        "torch-aot": ("fp16", "bf16", "fp32"),
        "gpu": ("fp16", "bf16", "int8", "fp32"),
    }.get(target)
    if precision is None or target in ("onnxruntime", "cpu"):
        if precision == "fp16":
            raise ValueError(
                "--precision fp16 is a GPU engine's (TensorRT, torch-aot); CPU engines are fp32, bf16 (OpenVINO) "
                "or int8"
            )
        return
    if allowed and precision not in allowed:
        raise ValueError(f"--precision {precision} is not a {target} precision: use {', '.join(allowed)}")


def _build_cpu(
    gate: _GateInputs, onnx_path: Path, target: str, precision: str | None, quantization: str | None
) -> tuple[list[tuple[str, Path, dict]], dict[str, str], Any]:
    """Build the CPU engines of `target` (`onnxruntime`, `openvino` or `cpu`: both); returns (backend, path,
    parity) of each engine kept, for `cpu` why each other one was left out, and one parity image."""
    from vitops.deploy.openvino import OpenVINOUnavailable
    from vitops.deploy.parity import ParityError, torch_logits

    model, parity, calibration = _read_gate_inputs(gate)
    reference = torch_logits(model, parity)
    jobs: list[tuple[str, Any]] = []
    if target in ("onnxruntime", "cpu"):
        mode = quantization or gate.e.ort_quantization
        jobs += _ort_jobs(onnx_path, gate, mode, parity, reference, calibration)
    skipped: dict[str, str] = {}
    if target in ("openvino", "cpu"):
        try:
            ov_jobs, ov_skipped = _ov_jobs(onnx_path, gate, precision, parity, reference, calibration)
        except OpenVINOUnavailable as err:
            if target == "openvino":
                raise
            ov_jobs, ov_skipped = [], {"openvino": str(err)}
        jobs += ov_jobs
        skipped |= ov_skipped
    built = []
    for backend, job in jobs:
        try:
            path, report = job()
        except (ParityError, OpenVINOUnavailable) as err:
            if target != "cpu":
                raise
            log.warning("%s left out: %s", backend, err)
            skipped[backend] = str(err)
            continue
        built.append((backend, path, report.as_dict()))
    if not built:
        raise ParityError(f"no CPU engine passed its gate: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
    return built, skipped, parity[:1]


def _ort_jobs(
    onnx_path: Path, gate: _GateInputs, quantization: str, parity: Any, reference: Any, calibration: Any
) -> list[tuple[str, Any]]:
    from vitops.deploy.onnxrt import QuantSettings, build_ort_engine

    e, x = gate.e, gate.x
    files = engine_files(e.out_dir)
    jobs: list[tuple[str, Any]] = [
        (
            "onnxruntime-fp32",
            lambda: build_ort_engine(
                onnx_path,
                files["onnxruntime-fp32"],
                parity,
                reference,
                "fp32",
                threads=e.ort_threads,
                min_top1_agreement=x.min_top1_agreement,
                max_abs_diff=x.max_abs_diff,
            ),
        )
    ]
    if quantization == "none":
        return jobs
    quant = QuantSettings(
        mode=quantization,
        per_channel=e.quant_per_channel,
        calibrate_method=e.quant_calibration,
        exclude=tuple(e.quant_exclude),
    )
    jobs.append(
        (
            "onnxruntime-int8",
            lambda: build_ort_engine(
                onnx_path,
                files["onnxruntime-int8"],
                parity,
                reference,
                "int8",
                quant=quant,
                threads=e.ort_threads,
                min_top1_agreement=e.min_int8_top1_agreement,
                calibration=calibration,
            ),
        )
    )
    return jobs


def _ov_jobs(
    onnx_path: Path, gate: _GateInputs, precision: str | None, parity: Any, reference: Any, calibration: Any
) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """One build per OpenVINO precision asked for (or, for `auto`, each this CPU runs natively), and why the
    others are left out. An explicit precision the CPU cannot run raises `OpenVINOUnavailable`."""
    from vitops.deploy.openvino import PRECISIONS, build_ov_engine, make_plan, precision_support, runtime_meta

    e, x = gate.e, gate.x
    runtime = runtime_meta()
    support = precision_support(runtime.extra["capabilities"], runtime.extra["isa"])
    wanted = precision or e.ov_precision
    files = engine_files(e.out_dir)
    jobs, skipped = [], {}
    for p in PRECISIONS:
        backend = f"openvino-{p}"
        if wanted not in ("auto", p):
            continue
        if wanted == "auto" and support[p]:
            skipped[backend] = support[p]
            continue
        plan = make_plan(p, support)  # raises for an explicit precision this CPU cannot run
        fp32 = p == "fp32"
        jobs.append(
            (
                backend,
                lambda plan=plan, fp32=fp32, out=files[backend]: build_ov_engine(
                    onnx_path,
                    out,
                    parity,
                    reference,
                    plan,
                    threads=e.ov_threads,
                    min_top1_agreement=x.min_top1_agreement if fp32 else e.min_int8_top1_agreement,
                    max_abs_diff=x.max_abs_diff if fp32 else None,
                    calibration=calibration,
                    runtime=runtime,
                ),
            )
        )
    return jobs, skipped


def _select(
    e: EngineParams, onnx_path: Path, built: list[tuple[str, Path, dict]], skipped: dict[str, str], image: Any
) -> dict[str, Any]:
    """Time the engines just built at batch 1 (interleaved rounds, CPU engines at their tuned threads, GPU engines
    from host memory to a finished result on the device), choose the one to serve with, and write `selection.json`
    beside them."""
    from dataclasses import asdict

    import numpy as np

    from vitops.common.files import sha256_file
    from vitops.deploy.latency import engine_runner
    from vitops.deploy.onnxrt import engine_threads
    from vitops.deploy.selection import Candidate, choose_engine, time_candidates, write_selection

    image = np.ascontiguousarray(image[:1], np.float32)
    runners = {backend: engine_runner(backend, path) for backend, path, _ in built}
    p50 = time_candidates(runners, image, e.select_iters)
    candidates = [
        Candidate(
            backend=backend,
            file=path.relative_to(e.out_dir).as_posix(),
            p50_ms=p50[backend],
            top1_agreement=float(report["top1_agreement"]),
            threads=engine_threads(path),
        )
        for backend, path, report in built
    ]
    floor = e.select_min_top1_agreement if e.select_min_top1_agreement is not None else e.min_int8_top1_agreement
    selection = choose_engine(candidates, floor, skipped)
    write_selection(e.out_dir, selection, sha256_file(onnx_path))
    log.info("serving with %s: %s", selection.chosen, selection.reason)
    return asdict(selection)


def _read_gate_inputs(gate: _GateInputs) -> tuple[Any, Any, Any]:
    """The PyTorch model, its parity images and its INT8 calibration images (one read of the val split)."""
    from vitops.vit.bundle import load_bundle

    model, meta = load_bundle(gate.model_dir)
    x, e = gate.x, gate.e
    images = validation_images(gate.dataset, meta, max(x.parity_images, e.calibration_images))
    images = images.numpy()
    return model, images[: x.parity_images], images[: e.calibration_images]
