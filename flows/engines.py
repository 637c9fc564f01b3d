"""Bodies of the engine stages (`flows.stages.export`, `build`, `bench`): ONNX export, engine builds behind
their parity gates, and the like-with-like latency benchmark."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vitops.flows.config import Params

log = logging.getLogger(__name__)


class EngineInputError(ValueError):
    """Inputs for an engine stage are missing (no validation images, no engines to bench)."""


def validation_images(params: Params, meta: Any, limit: int) -> Any:
    """Preprocessed validation images (a float tensor N, C, H, W) for parity gates and INT8 calibration."""
    from vitops.data_checks.manifest import load_usable
    from vitops.vit.data import load_split_tensors

    manifest, report = Path(params.validate_.manifest), Path(params.validate_.report)
    if not manifest.is_file():
        raise EngineInputError(f"{manifest}: no manifest; run `vitops validate` first (parity needs the val split)")
    rows = load_usable(manifest, report if report.is_file() else None)
    images, _ = load_split_tensors(Path(params.data.raw_dir), rows, meta, "val", limit=limit)
    if len(images) == 0:
        raise EngineInputError(f"{manifest}: the val split is empty; parity gates need validation images")
    return images


def export_checked_model(params: Params, model_dir: Path, out: Path, exporter: str | None = None) -> Any:
    """Export to ONNX behind the parity gate; returns a `flows.stages.ExportResult`."""
    from vitops.common.files import sha256_file
    from vitops.deploy.export import export_checked
    from vitops.flows.stages import ExportResult
    from vitops.vit.bundle import WEIGHTS_FILE, load_bundle

    model, meta = load_bundle(model_dir)
    images = validation_images(params, meta, params.export.parity_images)
    result, report = export_checked(
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
    return ExportResult(path=result.path, exporter=result.exporter, opset=result.opset, parity=report.as_dict())


def onnx_is_current(onnx_path: Path, model_dir: Path, params: Params) -> bool:
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
        and meta.extra.get("opset") == params.export.opset
        and meta.onnx_sha256 == sha256_file(onnx_path)
    )


def build_engines(
    params: Params, model_dir: Path, target: str | None, precision: str | None, quantization: str | None
) -> Any:
    """Export when needed, then build the target's engines; returns a `flows.stages.BuildResult`.

    `auto` on a machine without TensorRT builds every CPU engine this CPU runs (ONNX Runtime FP32/INT8,
    OpenVINO FP32/BF16/INT8): one that fails its gate or cannot run here is left out and named, the others
    are timed at batch 1 and the fastest that agrees enough is chosen (`selection.json`). An explicit target
    builds its own engines and stops at the first gate that says no.
    """
    from vitops.deploy.engine_meta import read_meta
    from vitops.deploy.tensorrt import choose_target, tensorrt_status
    from vitops.flows.stages import BuildResult, ExportResult

    requested = target or params.engine.target
    available, reason = tensorrt_status() if requested in ("auto", "tensorrt") else (False, "")
    chosen, notice = choose_target(requested, available, reason)
    _check_precision(chosen, precision)
    onnx_path = Path(params.export.out)
    if onnx_is_current(onnx_path, model_dir, params):
        meta = read_meta(onnx_path)
        onnx = ExportResult(onnx_path, meta.extra.get("exporter", "?"), meta.extra.get("opset", 0), {}, reused=True)
    else:
        onnx = export_checked_model(params, model_dir, onnx_path)
    if chosen == "tensorrt":
        built = [_build_tensorrt(model_dir, onnx_path, params, precision or params.engine.trt_precision)]
        return BuildResult(
            target=chosen, engines=[p for p, _ in built], parity={str(p): r for p, r in built}, onnx=onnx, notice=notice
        )
    built, skipped, image = _build_cpu(model_dir, onnx_path, params, chosen, precision, quantization or None)
    selection = _select(params, onnx_path, built, skipped, image)
    return BuildResult(
        target=chosen,
        engines=[p for _, p, _ in built],
        parity={str(p): r for _, p, r in built},
        onnx=onnx,
        notice=notice,
        skipped=skipped,
        selection=selection,
    )


def _check_precision(target: str, precision: str | None) -> None:
    """`--precision` names a precision of the target's engines (fp16 is TensorRT's, bf16 OpenVINO's)."""
    allowed = {"tensorrt": ("fp16", "int8", "fp32"), "openvino": ("fp32", "bf16", "int8")}.get(target)
    if precision is None or target in ("onnxruntime", "cpu"):
        if precision == "fp16":
            raise ValueError("--precision fp16 is TensorRT's; CPU engines are fp32, bf16 (OpenVINO) or int8")
        return
    if allowed and precision not in allowed:
        raise ValueError(f"--precision {precision} is not a {target} precision: use {', '.join(allowed)}")


def _build_cpu(
    model_dir: Path, onnx_path: Path, params: Params, target: str, precision: str | None, quantization: str | None
) -> tuple[list[tuple[str, Path, dict]], dict[str, str], Any]:
    """Build the CPU engines of `target` (`onnxruntime`, `openvino` or `cpu`: both); returns (backend, path,
    parity) of each engine kept, for `cpu` why each other one was left out, and one parity image."""
    from vitops.deploy.openvino import OpenVINOUnavailable
    from vitops.deploy.parity import ParityError, torch_logits

    model, parity, calibration = _gate_inputs(model_dir, params)
    reference = torch_logits(model, parity)
    jobs: list[tuple[str, Any]] = []
    if target in ("onnxruntime", "cpu"):
        mode = quantization or params.engine.ort_quantization
        jobs += _ort_jobs(onnx_path, params, mode, parity, reference, calibration)
    skipped: dict[str, str] = {}
    if target in ("openvino", "cpu"):
        try:
            ov_jobs, ov_skipped = _ov_jobs(onnx_path, params, precision, parity, reference, calibration)
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
    onnx_path: Path, params: Params, quantization: str, parity: Any, reference: Any, calibration: Any
) -> list[tuple[str, Any]]:
    from vitops.deploy.onnxrt import QuantSettings, build_ort_engine
    from vitops.flows.stages import ORT_FP32, ORT_INT8

    e = params.engine
    jobs: list[tuple[str, Any]] = [
        (
            "onnxruntime-fp32",
            lambda: build_ort_engine(
                onnx_path,
                e.out_dir / ORT_FP32,
                parity,
                reference,
                "fp32",
                threads=e.ort_threads,
                min_top1_agreement=params.export.min_top1_agreement,
                max_abs_diff=params.export.max_abs_diff,
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
                e.out_dir / ORT_INT8,
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
    onnx_path: Path, params: Params, precision: str | None, parity: Any, reference: Any, calibration: Any
) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """One build per OpenVINO precision asked for (or, for `auto`, each this CPU runs natively), and why the
    others are left out. An explicit precision the CPU cannot run raises `OpenVINOUnavailable`."""
    from vitops.deploy.openvino import PRECISIONS, build_ov_engine, make_plan, precision_support, runtime_meta

    e = params.engine
    runtime = runtime_meta()
    support = precision_support(runtime.extra["capabilities"], runtime.extra["isa"])
    wanted = precision or e.ov_precision
    files = engine_files(params)
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
                    min_top1_agreement=params.export.min_top1_agreement if fp32 else e.min_int8_top1_agreement,
                    max_abs_diff=params.export.max_abs_diff if fp32 else None,
                    calibration=calibration,
                    runtime=runtime,
                ),
            )
        )
    return jobs, skipped


def _select(
    params: Params, onnx_path: Path, built: list[tuple[str, Path, dict]], skipped: dict[str, str], image: Any
) -> dict[str, Any]:
    """Time the engines just built at batch 1 (interleaved rounds, each at its tuned threads), choose the one
    to serve with, and write `selection.json` beside them."""
    from dataclasses import asdict

    import numpy as np

    from vitops.common.files import sha256_file
    from vitops.deploy.onnxrt import engine_threads
    from vitops.deploy.selection import Candidate, choose_engine, time_candidates, write_selection

    e = params.engine
    image = np.ascontiguousarray(image[:1], np.float32)
    p50 = time_candidates({backend: cpu_runner(backend, path) for backend, path, _ in built}, image, e.select_iters)
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


def cpu_runner(backend: str, path: Path, threads: int = 0) -> Any:
    """A batch runner for a CPU engine by its backend name (`onnxruntime-*` or `openvino-*`); `threads` 0 = as
    tuned at build."""
    from vitops.deploy.latency import ort_runner, ov_runner

    return ov_runner(path, threads) if backend.startswith("openvino") else ort_runner(path, threads)


def _gate_inputs(model_dir: Path, params: Params) -> tuple[Any, Any, Any]:
    """The PyTorch model, its parity images and its INT8 calibration images (one read of the val split)."""
    from vitops.vit.bundle import load_bundle

    model, meta = load_bundle(model_dir)
    images = validation_images(params, meta, max(params.export.parity_images, params.engine.calibration_images))
    images = images.numpy()
    return model, images[: params.export.parity_images], images[: params.engine.calibration_images]


def _build_tensorrt(model_dir: Path, onnx_path: Path, params: Params, precision: str) -> tuple[Path, dict]:
    import torch

    from vitops.deploy.engine_meta import meta_path
    from vitops.deploy.onnxrt import QuantSettings, quantize_onnx
    from vitops.deploy.parity import compare_logits, require_parity, torch_logits
    from vitops.deploy.tensorrt import build_trt_engine, load_trt_engine, make_plan, runtime_meta
    from vitops.flows.stages import TRT_DIR

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
    log.info("wrote %s (%s, TensorRT %s)", out, runtime.device, runtime.runtime_version)
    return out, report.as_dict()


def engine_files(params: Params) -> dict[str, Path]:
    """Backend name -> engine file, for every engine the configured folder can hold."""
    from vitops.flows.stages import ORT_FP32, ORT_INT8, OV_DIR, TRT_DIR

    root = params.engine.out_dir
    return {
        "onnxruntime-fp32": root / ORT_FP32,
        "onnxruntime-int8": root / ORT_INT8,
        "openvino-fp32": root / OV_DIR / "fp32.zip",
        "openvino-bf16": root / OV_DIR / "bf16.zip",
        "openvino-int8": root / OV_DIR / "int8.zip",
        "tensorrt-fp16": root / TRT_DIR / "fp16.engine",
        "tensorrt-int8": root / TRT_DIR / "int8.engine",
    }


def current_engines(files: dict[str, Path], onnx_sha: str | None) -> tuple[set[str], list[str]]:
    """The backends whose engine file exists and was built from the current ONNX export (`onnx_sha`; None: no
    export to compare with), and a note for each one left out because it was built from another (an older
    model's engine that a later gate did not replace)."""
    from vitops.deploy.engine_meta import EngineMismatchError, read_meta

    current, notes = set(), []
    for name, path in files.items():
        if not path.is_file():
            continue
        try:
            built_from = read_meta(path).onnx_sha256
        except EngineMismatchError:
            built_from = None
        if onnx_sha is None or built_from == onnx_sha:
            current.add(name)
        else:
            notes.append(f"skipped {name} ({path} was built from another ONNX export); rebuild it with `vitops build`")
    return current, notes


def bench_model(params: Params, model_dir: Path, out: Path, iters: int | None, device: str, track: bool) -> Any:
    """Time torch and the built engines per device group; returns a `flows.stages.BenchOutcome`."""
    import numpy as np
    import torch

    from vitops.common.files import sha256_file
    from vitops.deploy.latency import (
        bench_backends,
        bench_report,
        format_table,
        kpi_metrics,
        plan_bench,
        torch_runner,
        trt_runner,
        write_report,
    )
    from vitops.deploy.onnxrt import cpu_name, engine_threads, physical_cores
    from vitops.deploy.roofline import achieved_gflops, model_flops
    from vitops.deploy.timing import thread_candidates, tune_threads
    from vitops.flows.stages import BenchOutcome
    from vitops.vit.bundle import WEIGHTS_FILE, load_bundle

    model, meta = load_bundle(model_dir)
    b = params.bench
    iters = iters or b.iters
    files = engine_files(params)
    onnx = Path(params.export.out)
    onnx_sha = sha256_file(onnx) if onnx.is_file() else None
    built, stale = current_engines(files, onnx_sha)
    cuda = torch.cuda.is_available()
    groups = plan_bench(device, cuda, built)
    rng = np.random.default_rng(0)
    shape = (3, meta.img_size, meta.img_size)
    image = rng.standard_normal((1, *shape), dtype=np.float32)
    batch = rng.standard_normal((b.large_batch, *shape), dtype=np.float32)
    flops = model_flops(model, torch.from_numpy(image))
    results, tables, notes, threads = [], [], list(stale), {}
    for group in groups:
        factories: dict[str, Any] = {}
        if group.device == "cpu":
            eager = b.threads
            if not eager:  # each backend at its fastest: torch is tuned here, engines were tuned at build
                cands = thread_candidates(physical_cores())
                eager, p50 = tune_threads(lambda n: torch_runner(model, threads=n), image, cands)
                by_threads = ", ".join(f"{n}: {ms:.2f} ms" for n, ms in p50.items())
                notes.append(f"torch eager batch-1 p50 by threads: {by_threads}")
            threads["torch-eager"] = eager
            factories["torch-eager"] = lambda n=eager: torch_runner(model, "cpu", threads=n)
            for name in group.backends[1:]:
                threads[name] = b.threads or engine_threads(files[name]) or physical_cores()
                factories[name] = lambda name=name, n=threads[name]: cpu_runner(name, files[name], n)
        else:
            factories["torch-cuda"] = lambda: torch_runner(model, "cuda")
            factories["torch-cuda-compile"] = lambda: torch_runner(model, "cuda", compile=True)
            for name in group.backends[2:]:
                factories[name] = lambda path=files[name]: trt_runner(path)
        group_results = bench_backends(factories, image, batch, b.warmup, iters, device=group.device, threads=threads)
        for result in group_results:
            result.gflops = achieved_gflops(flops, 1, result.p50_ms / 1e3)
        host = torch.cuda.get_device_name() if group.device == "cuda" else f"{cpu_name()}, {physical_cores()} cores"
        tables.append(f"{group.device}: {host}\n{format_table(group_results, reference=group.reference)}")
        results += group_results
    for name in sorted(set(files) - built):
        if (name.startswith(("onnxruntime", "openvino")) or cuda) and not files[name].is_file():
            notes.append(f"skipped {name} (no {files[name]}); build it with `vitops build`")
    target = _target_engine(params, onnx_sha, {r.backend for r in results})
    table = f"latency of {meta.model} at {meta.img_size}px\n" + "\n\n".join(tables)
    if target:
        table += f"\ntarget engine (serves this version): {target['engine']}: {target['reason']}"
    report = bench_report(
        results,
        {
            "model": {
                "dir": str(model_dir),
                "weights_sha256": sha256_file(model_dir / WEIGHTS_FILE),
                "arch": meta.model,
                "img_size": meta.img_size,
                "gflop_per_image": flops / 1e9,
            },
            "host": {"cpu": cpu_name(), "gpu": torch.cuda.get_device_name() if cuda else None, "threads": threads},
            "groups": [{"device": g.device, "reference": g.reference, "backends": g.backends} for g in groups],
            "engines": {name: str(files[name]) for name in sorted(built)},
            "target_engine": target["engine"] if target else None,
            "target_reason": target["reason"] if target else None,
            "torch": torch.__version__,
            "settings": {"warmup": b.warmup, "iters": iters, "large_batch": b.large_batch},
        },
    )
    write_report(report, out)
    table_file = out.with_suffix(".txt")
    table_file.write_text(table + "\n", encoding="utf-8")
    metrics = kpi_metrics(results)
    run_id = _log_bench(params, out, table_file, metrics, track)
    return BenchOutcome(out=out, table=table, results=results, metrics=metrics, skipped=notes, run_id=run_id)


def _target_engine(params: Params, onnx_sha: str | None, timed: set[str]) -> dict[str, str] | None:
    """The engine `vitops build` chose to serve with (`selection.json`), if it was made for the current ONNX
    export (`onnx_sha`) and was timed in this bench."""
    from vitops.deploy.selection import read_selection

    selection = read_selection(params.engine.out_dir, onnx_sha or "")
    if not selection or selection.get("chosen") not in timed:
        return None
    return {"engine": selection["chosen"], "reason": selection.get("reason", "")}


def _log_bench(params: Params, out: Path, table_file: Path, metrics: dict[str, float], track: bool) -> str | None:
    from vitops.flows import tracking

    def _log(handle: Any) -> str:
        handle.log_metrics(metrics)
        handle.log_artifact(out, artifact_path="bench")
        handle.log_artifact(table_file, artifact_path="bench")
        return handle.run_id

    if track:
        tracking.configure(params.tracking.uri, params.tracking.experiment)
        with tracking.start_run("bench", tags={"stage": "bench"}) as handle:
            return _log(handle)
    handle = tracking.active_run()
    return _log(handle) if handle is not None else None
