"""The bench stage: torch and every built engine timed like with like, the table the latency KPI reads.

bench(model_dir, out, settings, engine_dir, onnx)   batch-1 latency and throughput per backend, per device
                                                    group (torch CUDA against TensorRT and torch-aot, torch CPU
                                                    against ONNX Runtime and OpenVINO); JSON + table  -> BenchOutcome
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.deploy.engine_meta import engine_files
from vitops.flows import tracking
from vitops.flows.config import BenchParams
from vitops.flows.tracking import RunContext


@dataclass
class BenchOutcome:
    out: Path
    table: str
    results: list[Any]  # deploy.latency.BenchResult per backend
    metrics: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    run_id: str | None = None


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


def engine_devices(files: dict[str, Path], backends: set[str]) -> dict[str, str]:
    """The device each torch-aot engine among `backends` was built for (`cuda` or `cpu`, from its metadata)."""
    from vitops.deploy.engine_meta import EngineMismatchError, read_meta

    devices = {}
    for name in sorted(b for b in backends if b.startswith("torch-aot")):
        try:
            devices[name] = str(read_meta(files[name]).extra.get("device_type", "cuda"))
        except EngineMismatchError:
            continue
    return devices


def bench(
    model_dir: Path,
    out: Path,
    settings: BenchParams,
    engine_dir: Path,
    onnx: Path,
    iters: int | None = None,
    device: str = "auto",
    run: RunContext | None = None,
    track: bool = False,
) -> BenchOutcome:
    """Time torch and every engine under `engine_dir` built from the ONNX export `onnx`; write the JSON `out` and
    its table; log to MLflow (with `track`: a new run under `run`; else into a run already open, if any).

    Args:
        settings: warm-up, iterations, batch size of the throughput figure, threads (`bench` of params.yaml).
        iters: overrides `settings.iters`.
        device: `auto` (both groups where CUDA is available), `cpu` or `cuda`.
    """
    import numpy as np
    import torch

    from vitops.common.files import sha256_file
    from vitops.deploy.latency import (
        bench_backends,
        bench_report,
        cpu_runner,
        engine_runner,
        format_table,
        kpi_metrics,
        plan_bench,
        torch_runner,
        write_report,
    )
    from vitops.deploy.onnxrt import cpu_name, engine_threads, physical_cores
    from vitops.deploy.roofline import achieved_gflops, model_flops
    from vitops.deploy.timing import thread_candidates, tune_threads
    from vitops.vit.bundle import WEIGHTS_FILE, load_bundle

    model, meta = load_bundle(model_dir)
    b = settings
    iters = iters or b.iters
    files = engine_files(engine_dir)
    onnx = Path(onnx)
    onnx_sha = sha256_file(onnx) if onnx.is_file() else None
    built, stale = current_engines(files, onnx_sha)
    cuda = torch.cuda.is_available()
    groups = plan_bench(device, cuda, built, engine_devices(files, built))
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
                factories[name] = lambda name=name: engine_runner(name, files[name])
        group_results = bench_backends(factories, image, batch, b.warmup, iters, device=group.device, threads=threads)
        for result in group_results:
            result.gflops = achieved_gflops(flops, 1, result.p50_ms / 1e3)
        host = torch.cuda.get_device_name() if group.device == "cuda" else f"{cpu_name()}, {physical_cores()} cores"
        tables.append(f"{group.device}: {host}\n{format_table(group_results, reference=group.reference)}")
        results += group_results
    for name in sorted(set(files) - built):
        if (name.startswith(("onnxruntime", "openvino")) or cuda) and not files[name].is_file():
            notes.append(f"skipped {name} (no {files[name]}); build it with `vitops build`")
    target = _target_engine(engine_dir, onnx_sha, {r.backend for r in results})
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
    run_id = _log_bench(run if track else None, out, table_file, metrics)
    return BenchOutcome(out=out, table=table, results=results, metrics=metrics, skipped=notes, run_id=run_id)


def _target_engine(engine_dir: Path, onnx_sha: str | None, timed: set[str]) -> dict[str, str] | None:
    """The engine `vitops build` chose to serve with (`selection.json`), if it was made for the current ONNX
    export (`onnx_sha`) and was timed in this bench."""
    from vitops.deploy.selection import read_selection

    selection = read_selection(engine_dir, onnx_sha or "")
    if not selection or selection.get("chosen") not in timed:
        return None
    return {"engine": selection["chosen"], "reason": selection.get("reason", "")}


def _log_bench(run: RunContext | None, out: Path, table_file: Path, metrics: dict[str, float]) -> str | None:
    """Log into a new run under `run`, or (None) into the run already open in this process, if any."""

    def _log(handle: Any) -> str:
        handle.log_metrics(metrics)
        handle.log_artifact(out, artifact_path="bench")
        handle.log_artifact(table_file, artifact_path="bench")
        return handle.run_id

    if run is not None:
        run.configure()
        with tracking.start_run("bench", tags={"stage": "bench"}, parent_run_id=run.parent_run_id) as handle:
            return _log(handle)
    handle = tracking.active_run()
    return _log(handle) if handle is not None else None
