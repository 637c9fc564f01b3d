"""`vitops` commands of the engine stage group: export, build, bench.

    vitops export [MODEL_DIR]      ONNX export + parity gate against PyTorch on the validation split
    vitops build  [MODEL_DIR] [--target auto|onnxruntime|tensorrt]
                                   engines for the target (exports first when the ONNX file is missing or stale)
    vitops bench  [MODEL_DIR]      latency table + JSON (params.bench.out), logged to MLflow with --track

MODEL_DIR is a model folder (`model.json` + `weights.safetensors`), by default the one `vitops train`
wrote (`train.out_dir`/model). Engines go to `engine.out_dir`, each with a `.json` metadata file beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows.config import Params


class EngineInputError(ValueError):
    """Inputs for an engine command are missing (no validation images, no engines to bench)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from deploy.engine_meta import EngineMismatchError
    from deploy.export import ExportError
    from deploy.parity import ParityError
    from deploy.tensorrt import TensorRTBuildError, TensorRTUnavailable
    from vit.bundle import BundleError

    return (
        BundleError,
        ExportError,
        ParityError,
        EngineMismatchError,
        TensorRTUnavailable,
        TensorRTBuildError,
        EngineInputError,
    )


# Engine files under engine.out_dir, one folder per target (each a DVC output of its own).
ORT_FP32 = "onnxruntime/fp32.onnx"
ORT_INT8 = "onnxruntime/int8.onnx"
TRT_DIR = "tensorrt"


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser("export", help="export a model folder to ONNX and check it against PyTorch")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument("--out", help="ONNX file (default: export.out)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], help="default: export.exporter")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("build", help="build inference engines: TensorRT on NVIDIA GPUs, ONNX Runtime on CPUs")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument("--target", choices=["auto", "onnxruntime", "tensorrt"], help="default: engine.target")
    p.add_argument("--precision", choices=["fp16", "int8", "fp32"], help="TensorRT precision (engine.trt_precision)")
    p.add_argument(
        "--quantization", choices=["none", "static", "dynamic"], help="ONNX Runtime INT8 (engine.ort_quantization)"
    )
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("bench", help="latency benchmark: torch and the built engines; writes bench.out")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument("--out", help="JSON file (default: bench.out)")
    p.add_argument("--iters", type=int, help="timed batch-1 calls per backend (bench.iters)")
    p.add_argument("--track", action="store_true", help="log to a new MLflow run (an open run is always used)")
    p.set_defaults(handler=cmd_bench)


def model_folder(arg: str | None, params: Params) -> Path:
    """The model folder named on the command line, or the one training wrote."""
    path = Path(arg) if arg else params.train.out_dir / "model"
    if not (path / "model.json").is_file() and (path / "model" / "model.json").is_file():
        path = path / "model"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no model folder here; train one with `vitops train` or name one")
    return path


def validation_images(params: Params, meta: Any, limit: int) -> Any:
    """Preprocessed validation images (a float tensor N, C, H, W) for parity gates and INT8 calibration."""
    from data_checks.manifest import load_usable
    from vit.data import load_split_tensors

    manifest, report = Path(params.validate_.manifest), Path(params.validate_.report)
    if not manifest.is_file():
        raise EngineInputError(f"{manifest}: no manifest; run `vitops validate` first (parity needs the val split)")
    rows = load_usable(manifest, report if report.is_file() else None)
    images, _ = load_split_tensors(Path(params.data.raw_dir), rows, meta, "val", limit=limit)
    if len(images) == 0:
        raise EngineInputError(f"{manifest}: the val split is empty; parity gates need validation images")
    return images


def cmd_export(args: argparse.Namespace, params: Params) -> int:
    """Export to ONNX and hold it to the parity gate; a failing gate leaves no file."""
    out = Path(args.out) if args.out else params.export.out
    result, report = _export(model_folder(args.model_dir, params), out, params, args.exporter)
    print(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset}); parity: {report.describe()}")
    return 0


def _export(model_dir: Path, out: Path, params: Params, exporter: str | None = None) -> tuple[Any, Any]:
    from deploy.engine_meta import sha256_file
    from deploy.export import export_checked
    from vit.bundle import WEIGHTS_FILE, load_bundle

    model, meta = load_bundle(model_dir)
    images = validation_images(params, meta, params.export.parity_images)
    return export_checked(
        model,
        images,
        out,
        opset=params.export.opset,
        exporter=exporter or params.export.exporter,
        max_abs_diff=params.export.max_abs_diff,
        min_top1_agreement=params.export.min_top1_agreement,
        threads=params.engine.ort_threads,
        source={"model_dir": str(model_dir), "weights_sha256": sha256_file(model_dir / WEIGHTS_FILE)},
    )


def _onnx_is_current(onnx_path: Path, model_dir: Path, params: Params) -> bool:
    from deploy.engine_meta import EngineMismatchError, read_meta, sha256_file
    from vit.bundle import WEIGHTS_FILE

    if not onnx_path.is_file():
        return False
    try:
        meta = read_meta(onnx_path)
    except EngineMismatchError:
        return False
    return (
        meta.extra.get("source", {}).get("weights_sha256") == sha256_file(model_dir / WEIGHTS_FILE)
        and meta.extra.get("opset") == params.export.opset
        and meta.onnx_sha256 == sha256_file(onnx_path)
    )


def cmd_build(args: argparse.Namespace, params: Params) -> int:
    """Build the engines of the target; TensorRT falls back to ONNX Runtime (visibly) without CUDA."""
    from deploy.tensorrt import choose_target, tensorrt_status

    model_dir = model_folder(args.model_dir, params)
    requested = args.target or params.engine.target
    available, reason = tensorrt_status() if requested != "onnxruntime" else (False, "")
    target, message = choose_target(requested, available, reason)
    if message:
        print(f"vitops build: {message}")
    onnx_path = params.export.out
    if _onnx_is_current(onnx_path, model_dir, params):
        print(f"using {onnx_path} (exported from this model)")
    else:
        result, report = _export(model_dir, onnx_path, params)
        print(f"wrote {result.path} ({result.exporter} exporter); parity: {report.describe()}")
    if target == "tensorrt":
        return _build_tensorrt(model_dir, onnx_path, params, args.precision or params.engine.trt_precision)
    return _build_onnxruntime(model_dir, onnx_path, params, args.quantization or params.engine.ort_quantization)


def _gate_inputs(model_dir: Path, params: Params) -> tuple[Any, Any, Any]:
    """The PyTorch model, its parity images and its INT8 calibration images (one read of the val split)."""
    from vit.bundle import load_bundle

    model, meta = load_bundle(model_dir)
    images = validation_images(params, meta, max(params.export.parity_images, params.engine.calibration_images))
    images = images.numpy()
    return model, images[: params.export.parity_images], images[: params.engine.calibration_images]


def _build_onnxruntime(model_dir: Path, onnx_path: Path, params: Params, quantization: str) -> int:
    from deploy.onnxrt import QuantSettings, build_ort_engine
    from deploy.parity import torch_logits

    e = params.engine
    model, parity, calibration = _gate_inputs(model_dir, params)
    reference = torch_logits(model, parity)
    path, report = build_ort_engine(
        onnx_path,
        e.out_dir / ORT_FP32,
        parity,
        reference,
        "fp32",
        threads=e.ort_threads,
        min_top1_agreement=params.export.min_top1_agreement,
        max_abs_diff=params.export.max_abs_diff,
    )
    print(f"wrote {path}; parity: {report.describe()}")
    if quantization == "none":
        return 0
    quant = QuantSettings(
        mode=quantization,
        per_channel=e.quant_per_channel,
        calibrate_method=e.quant_calibration,
        exclude=tuple(e.quant_exclude),
    )
    path, report = build_ort_engine(
        onnx_path,
        e.out_dir / ORT_INT8,
        parity,
        reference,
        "int8",
        quant=quant,
        threads=e.ort_threads,
        min_top1_agreement=e.min_int8_top1_agreement,
        calibration=calibration,
    )
    print(f"wrote {path}; parity: {report.describe()}")
    return 0


def _build_tensorrt(model_dir: Path, onnx_path: Path, params: Params, precision: str) -> int:
    import torch

    from deploy.engine_meta import meta_path
    from deploy.onnxrt import QuantSettings, quantize_onnx
    from deploy.parity import compare_logits, require_parity, torch_logits
    from deploy.tensorrt import build_trt_engine, load_trt_engine, make_plan, runtime_meta

    e = params.engine
    runtime = runtime_meta()
    model, parity, calibration = _gate_inputs(model_dir, params)
    source = onnx_path
    if precision == "int8":
        # Explicit quantization: symmetric INT8 Q/DQ calibrated on validation images, built by TensorRT.
        source = e.out_dir / TRT_DIR / "model_qdq.onnx"
        quant = QuantSettings(mode="static", activation_symmetric=True, calibrate_method=e.quant_calibration)
        quantize_onnx(onnx_path, source, quant, calibration)
    plan = make_plan(
        source,
        precision,
        {"min": e.trt_min_batch, "opt": e.trt_opt_batch, "max": e.trt_max_batch},
        runtime.compute_capability,
        e.trt_workspace_gib,
    )
    out = e.out_dir / TRT_DIR / f"{plan.precision}.engine"
    staged = out.with_name(f".{out.name}.candidate")
    try:
        build_trt_engine(source, staged, plan, e.trt_timing_cache, runtime)
        run = load_trt_engine(staged, runtime)
        step = e.trt_max_batch
        chunks = [run(torch.from_numpy(parity[i : i + step])).float().cpu() for i in range(0, len(parity), step)]
        floor = e.min_int8_top1_agreement if plan.precision == "int8" else params.export.min_top1_agreement
        report = require_parity(
            compare_logits(torch_logits(model, parity), torch.cat(chunks).numpy(), f"tensorrt-{plan.precision}", floor)
        )
        meta_path(staged).replace(meta_path(out))  # publish: both renames are atomic
        staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
        meta_path(staged).unlink(missing_ok=True)
    print(f"wrote {out} ({runtime.device}, TensorRT {runtime.runtime_version}); parity: {report.describe()}")
    return 0


def cmd_bench(args: argparse.Namespace, params: Params) -> int:
    """Time torch and every built engine; print the table, write the JSON, log to MLflow."""
    import numpy as np
    import torch

    from deploy.latency import (
        bench_backends,
        bench_report,
        format_table,
        kpi_metrics,
        ort_runner,
        thread_candidates,
        torch_runner,
        trt_runner,
        tune_threads,
        write_report,
    )
    from deploy.onnxrt import cpu_name, engine_threads, physical_cores
    from deploy.roofline import achieved_gflops, model_flops
    from vit.bundle import load_bundle

    model_dir = model_folder(args.model_dir, params)
    model, meta = load_bundle(model_dir)
    b, engines = params.bench, params.engine.out_dir
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rng = np.random.default_rng(0)
    shape = (3, meta.img_size, meta.img_size)
    image = rng.standard_normal((1, *shape), dtype=np.float32)
    batch = rng.standard_normal((b.large_batch, *shape), dtype=np.float32)
    threads: dict[str, int] = {}
    if b.threads:
        threads["torch-eager"] = b.threads
    elif not cuda:  # each backend at its fastest: torch is tuned here, engines were tuned at build
        best, p50 = tune_threads(lambda n: torch_runner(model, threads=n), image, thread_candidates(physical_cores()))
        threads["torch-eager"] = best
        print(f"torch eager batch-1 p50 by threads: {', '.join(f'{n}: {ms:.2f} ms' for n, ms in p50.items())}")
    eager_threads = threads.get("torch-eager", 0)
    factories: dict[str, Any] = {"torch-eager": lambda: torch_runner(model, device, threads=eager_threads)}
    skipped = []
    if cuda:
        factories["torch-compile"] = lambda: torch_runner(model, device, compile=True)
        for precision in ("fp16", "int8"):
            path = engines / TRT_DIR / f"{precision}.engine"
            if path.is_file():
                factories[f"tensorrt-{precision}"] = lambda path=path: trt_runner(path)
            else:
                skipped.append(f"tensorrt-{precision} (no {path})")
    for name, file in (("onnxruntime-fp32", ORT_FP32), ("onnxruntime-int8", ORT_INT8)):
        if (engines / file).is_file():
            threads[name] = b.threads or engine_threads(engines / file) or physical_cores()
            factories[name] = lambda path=engines / file, n=threads[name]: ort_runner(path, n)
        else:
            skipped.append(f"{name} (no {engines / file})")
    if skipped:
        print(f"vitops bench: skipped {', '.join(skipped)}; build them with `vitops build`")
    results = bench_backends(factories, image, batch, b.warmup, args.iters or b.iters, device=device, threads=threads)
    flops = model_flops(model, torch.from_numpy(image))
    for result in results:
        if result.backend.startswith("onnxruntime"):
            result.device = "cpu"  # ONNX Runtime engines run on the CPU even on a GPU machine
        result.gflops = achieved_gflops(flops, 1, result.p50_ms / 1e3)
    table = format_table(results, reference="torch-eager")
    host = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {physical_cores()} physical cores"
    print(f"latency of {meta.model} at {meta.img_size}px on {host}\n{table}")
    report = bench_report(
        results,
        {
            "model": {
                "dir": str(model_dir),
                "arch": meta.model,
                "img_size": meta.img_size,
                "gflop_per_image": flops / 1e9,
            },
            "host": {"device": host, "threads": threads, "torch": torch.__version__},
            "settings": {"warmup": b.warmup, "iters": args.iters or b.iters, "large_batch": b.large_batch},
        },
    )
    out = Path(args.out) if args.out else b.out
    write_report(report, out)
    print(f"wrote {out}")
    _log_bench(params, out, table, kpi_metrics(results), track=args.track)
    return 0


def _log_bench(params: Params, out: Path, table: str, metrics: dict[str, float], track: bool) -> None:
    from flows import tracking

    table_file = out.with_suffix(".txt")
    table_file.write_text(table + "\n", encoding="utf-8")

    def _log(handle: Any) -> None:
        handle.log_metrics(metrics)
        handle.log_artifact(out, artifact_path="bench")
        handle.log_artifact(table_file, artifact_path="bench")

    if track:
        tracking.configure(params.tracking.uri, params.tracking.experiment)
        with tracking.start_run("bench") as handle:
            _log(handle)
        print(f"logged to MLflow run {handle.run_id}")
        return
    handle = tracking.active_run()
    if handle is not None:
        _log(handle)
