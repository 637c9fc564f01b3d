"""`vitops` commands of the engine stage group: export, build, bench.

    vitops export [MODEL_DIR]      ONNX export + parity gate against PyTorch on the validation split
    vitops build  [MODEL_DIR] [--target auto|onnxruntime|openvino|tensorrt|torch-aot] [--precision fp32|bf16|int8|fp16]
                                   engines for the target (exports first when the ONNX file is missing or stale);
                                   auto: with CUDA TensorRT (if installed) and torch-aot, on a CPU every CPU engine;
                                   the fastest that agrees enough is served
    vitops bench  [MODEL_DIR]      latency table + JSON (params.bench.out), logged to MLflow with --track

MODEL_DIR is a model folder (`model.json` + `weights.safetensors`), by default the one `vitops train`
wrote (`train.out_dir`/model). Engines go to `engine.out_dir`, each with a `.json` metadata file beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitops.flows.config import Params
from vitops.flows.settings import dataset_of, model_folder, run_context


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.deploy.engine_meta import EngineMismatchError
    from vitops.deploy.export import ExportError
    from vitops.deploy.openvino import OpenVINOUnavailable
    from vitops.deploy.parity import ParityError
    from vitops.deploy.tensorrt import TensorRTBuildError, TensorRTUnavailable
    from vitops.deploy.torch_aot import AotUnavailable
    from vitops.flows.engines import EngineInputError
    from vitops.vit.bundle import BundleError

    return (
        BundleError,
        ExportError,
        ParityError,
        EngineMismatchError,
        TensorRTUnavailable,
        TensorRTBuildError,
        AotUnavailable,
        OpenVINOUnavailable,
        EngineInputError,
        ValueError,  # e.g. bench --device cuda on a machine without CUDA (deploy.latency.plan_bench)
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser("export", help="export a model folder to ONNX and check it against PyTorch")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument("--out", help="ONNX file (default: export.out)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], help="default: export.exporter")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "build",
        help="build inference engines: TensorRT and torch-aot on NVIDIA GPUs, ONNX Runtime and OpenVINO on CPUs",
    )
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument(
        "--target",
        choices=["auto", "onnxruntime", "openvino", "tensorrt", "torch-aot"],
        help="default: engine.target (auto: with CUDA TensorRT and torch-aot, else every CPU engine; fastest served)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8", "fp16"],
        help="OpenVINO: fp32|bf16|int8 (engine.ov_precision); TensorRT: fp16|int8|fp32 (engine.trt_precision); "
        "torch-aot: fp16|bf16|fp32 (engine.aot_precision)",
    )
    p.add_argument(
        "--quantization", choices=["none", "static", "dynamic"], help="ONNX Runtime INT8 (engine.ort_quantization)"
    )
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("bench", help="latency benchmark: torch and the built engines; writes bench.out")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument("--out", help="JSON file (default: bench.out)")
    p.add_argument("--iters", type=int, help="timed batch-1 calls per backend (bench.iters)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help=(
            "auto: both sides where CUDA is available (torch CUDA vs TensorRT and torch-aot, torch CPU vs ONNX Runtime "
            "and OpenVINO); default auto"
        ),
    )
    p.add_argument("--track", action="store_true", help="log to a new MLflow run (an open run is always used)")
    p.set_defaults(handler=cmd_bench)


def cmd_export(args: argparse.Namespace, params: Params) -> int:
    """Export to ONNX and hold it to the parity gate; a failing gate leaves no file."""
    from vitops.flows.engines import export

    model_dir, out = model_folder(args.model_dir, params), Path(args.out or params.export.out)
    result = export(model_dir, dataset_of(params), out, params.export, params.engine.ort_threads, args.exporter)
    print(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset}); parity: {_parity(result.parity)}")
    return 0


def cmd_build(args: argparse.Namespace, params: Params) -> int:
    """Build the engines of the target; TensorRT falls back to ONNX Runtime (visibly) without CUDA."""
    from vitops.flows.engines import build

    model_dir = model_folder(args.model_dir, params)
    result = build(
        model_dir, dataset_of(params), params.export, params.engine, args.target, args.precision, args.quantization
    )
    if result.notice:
        print(f"vitops build: {result.notice}")
    onnx = result.onnx
    if onnx.reused:
        print(f"using {onnx.path} (exported from this model)")
    else:
        print(f"wrote {onnx.path} ({onnx.exporter} exporter); parity: {_parity(onnx.parity)}")
    for path in result.engines:
        print(f"wrote {path}; parity: {_parity(result.parity[str(path)])}")
    for backend, why in result.skipped.items():
        print(f"vitops build: {backend} not built: {why}")
    if result.selection:
        sel = result.selection
        for c in sel["candidates"]:
            mark = "*" if c.get("chosen") else " "
            extra = f"  ({c['passed_over']})" if c.get("passed_over") else ""
            timing = f"p50 {c['p50_ms']:.3f} ms" if c.get("p50_ms") is not None else "not timed"
            print(f"  {mark} {c['backend']:<18} {timing}  top-1 agreement {c['top1_agreement']:.2%}{extra}")
        print(f"serving with {sel['chosen']}: {sel['reason']}")
    return 0


def cmd_bench(args: argparse.Namespace, params: Params) -> int:
    """Time torch and every built engine; print the table, write the JSON, log to MLflow."""
    from vitops.flows.benchmark import bench

    result = bench(
        model_folder(args.model_dir, params),
        Path(args.out or params.bench.out),
        params.bench,
        params.engine.out_dir,
        params.export.out,
        iters=args.iters,
        device=args.device,
        run=run_context(params),
        track=args.track,
    )
    for note in result.skipped:
        print(f"vitops bench: {note}")
    print(result.table)
    print(f"wrote {result.out}" + (f"; logged to MLflow run {result.run_id}" if result.run_id else ""))
    return 0


def _parity(report: dict[str, Any]) -> str:
    """One line of a parity report (as `deploy.parity.ParityReport.describe` writes it)."""
    from vitops.deploy.parity import ParityReport

    fields = {k: v for k, v in report.items() if k != "passed"}
    return ParityReport(**fields).describe() if report else "checked"
