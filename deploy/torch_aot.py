"""torch-aot engines: the model exported by torch.export (dynamic batch) and compiled ahead of time by AOTInductor, a
GPU engine that needs no TensorRT (AOTInductor compiles for CPUs as well, which is how it is tested without a GPU).

`build_aot_engine` builds in a temporary folder next to the engine, holds each route to the parity gate against
PyTorch, and only then publishes the engine zip (`deploy/aot_runtime.py` describes it) with its metadata:

1. `torch.export.export` of the model cast to the engine's precision (the casts of the float32 input and logits
   are in the graph), with a dynamic batch of 1 to `max_batch`;
2. `aoti_compile_and_package`: the `aoti` route, loaded and run on the parity images in a child process (on an
   H200 with torch 2.11 loading a ViT-B/16 FP16 package crashed the process: it must not take the build down);
3. the `compile` route (`fallback`: `compile` always, `on-failure` only when the aoti route failed, `none` never):
   the exported program through torch.compile (`reduce-overhead`, CUDA graphs, on CUDA), gated the same way; its
   cache artifacts go into the engine;
4. the engine serves by the first route that passed (`route`), the other is its `fallback`; none passed:
   `ParityError`, and nothing is written (an older engine stays).

The metadata records torch and CUDA versions, GPU name and compute capability (or CPU name and ISA), and
`load_aot_engine` refuses an engine built anywhere else (`EngineMismatchError`: rebuild it here). The torch calls
sit in `_export`, `_package` and `_compile_route`; every decision around them is a plain function.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vitops.common.files import atomic_copy, utc_now
from vitops.deploy import aot_runtime
from vitops.deploy.engine_meta import EngineMeta, check_compatible, read_meta, vitops_version, write_meta
from vitops.deploy.parity import ParityError, ParityReport, compare_logits, run_batched

log = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "bf16", "fp32")


class AotUnavailable(RuntimeError):
    """torch-aot cannot build here as asked (no CUDA device for `cuda`, no AOTInductor in this torch)."""


@dataclass
class AotPlan:
    """What to build.

    Attributes:
        precision: weights and activations (`fp16`, `bf16`, `fp32`); inputs and logits stay float32.
        device: `cuda` or `cpu`.
        input_chw: channels, height, width of one image.
        max_batch: the largest batch of the dynamic batch dimension (the smallest is 1).
        fallback: `compile` (build and gate the torch.compile route too), `on-failure` (only when the aoti route
            fails: faster builds where it runs, no fallback at stations where it then fails) or `none`.
        note: why the precision differs from the one asked for, if it does.
    """

    precision: Precision
    device: Literal["cuda", "cpu"]
    input_chw: tuple[int, int, int]
    max_batch: int = 256
    fallback: Literal["compile", "on-failure", "none"] = "compile"
    note: str = ""


def torch_aot_status() -> tuple[bool, str]:
    """Whether this torch has AOTInductor (`torch._inductor.aoti_compile_and_package`), and why not."""
    try:
        import torch._inductor
    except ImportError as err:
        return False, f"torch is missing ({err})"
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return False, f"torch {torch.__version__} has no AOTInductor packaging (torch >= 2.6 has)"
    return True, ""


def choose_device(requested: str, cuda_available: bool) -> Literal["cuda", "cpu"]:
    """`auto`: CUDA where there is a device, else the CPU.

    Raises:
        AotUnavailable: `cuda` asked for on a machine without a CUDA device.
    """
    if requested == "cuda" and not cuda_available:
        raise AotUnavailable("torch-aot for CUDA was asked for, but torch sees no CUDA device here")
    if requested in ("cuda", "cpu"):
        return requested  # type: ignore[return-value]
    return "cuda" if cuda_available else "cpu"


def choose_precision(requested: str, device: str, bf16_supported: bool = True) -> tuple[Precision, str]:
    """`auto`: FP16 on CUDA, FP32 on the CPU; BF16 on a GPU without it (before compute capability 8.0) becomes FP16,
    with a note."""
    if requested == "auto":
        return ("fp16" if device == "cuda" else "fp32"), ""
    if requested not in PRECISIONS:
        raise ValueError(f"torch-aot precision {requested!r}: use one of auto, {', '.join(PRECISIONS)}")
    if requested == "bf16" and device == "cuda" and not bf16_supported:
        return "fp16", "this GPU has no fast BF16 (compute capability < 8.0); building FP16"
    return requested, ""  # type: ignore[return-value]


def make_plan(
    precision: str, device: str, input_chw: tuple[int, int, int], max_batch: int = 256, fallback: str = "compile"
) -> AotPlan:
    """The plan for this machine: its device and the precision it runs (see `choose_device`, `choose_precision`)."""
    import torch

    ok, why = torch_aot_status()
    if not ok:
        raise AotUnavailable(why)
    chosen_device = choose_device(device, torch.cuda.is_available())
    bf16 = chosen_device != "cuda" or torch.cuda.is_bf16_supported()
    chosen, note = choose_precision(precision, chosen_device, bf16)
    if note:
        log.warning("%s", note)
    if max_batch < 2:
        raise ValueError(f"torch-aot max batch must be at least 2, got {max_batch}")
    return AotPlan(chosen, chosen_device, tuple(input_chw), max_batch, fallback, note)  # type: ignore[arg-type]


def runtime_meta(device: str) -> EngineMeta:
    """This machine's torch (and CUDA, GPU) or CPU fields, for metadata and compatibility checks."""
    try:
        fields = aot_runtime.machine(device)
    except aot_runtime.AotUnavailable as err:
        raise AotUnavailable(str(err)) from err
    return EngineMeta(
        target="torch-aot",
        precision="",
        onnx_sha256="",
        runtime_version=fields["torch"],
        device=fields["device"],
        compute_capability=fields.get("compute_capability", ""),
        extra={"device_type": device, "cuda": fields.get("cuda", ""), "isa": fields.get("isa", [])},
    )


def choose_route(reports: dict[str, ParityReport | str]) -> tuple[str, str]:
    """The route to serve by and its fallback, from each route's parity report (or why it did not run).

    `aoti` first (no compile at load), then `compile`; the fallback is the other route that passed, or `compile` when
    it was not built (empty when it failed its gate).

    Raises:
        ParityError: no route passed; the message has every route's figures or failure.
    """
    passed = [r for r in aot_runtime.ROUTES if isinstance(reports.get(r), ParityReport) and reports[r].passed]
    if not passed:
        why = [f"{r}: {v if isinstance(v, str) else v.describe()}" for r, v in reports.items()]
        raise ParityError(f"parity gate failed: torch-aot: {'; '.join(why)}; the engine was not kept")
    return passed[0], passed[1] if len(passed) > 1 else ""


def build_aot_engine(
    model: Any,
    out: Path,
    images: np.ndarray,
    reference: np.ndarray,
    plan: AotPlan,
    min_top1_agreement: float = 0.99,
    max_abs_diff: float | None = None,
    onnx_sha256: str = "",
    runtime: EngineMeta | None = None,
) -> tuple[Path, ParityReport]:
    """Build a torch-aot engine, hold its routes to the parity gate, then publish it with its metadata.

    Args:
        model: the FP32 PyTorch model (not changed: a copy is cast and exported).
        out: the engine file (`<precision>.zip`); `out.json` gets its metadata.
        images: parity images (validation split), preprocessed float32 `N, C, H, W`.
        reference: PyTorch FP32 logits of `images`.
        plan: from `make_plan`.
        min_top1_agreement: parity floor of every route.
        max_abs_diff: parity limit on logits (None: agreement only, as for reduced precisions).
        onnx_sha256: the ONNX export of the same weights, so that bench and registration see the engine as current.
        runtime: this machine (default: `runtime_meta(plan.device)`).

    Raises:
        ParityError: no route agrees with PyTorch; nothing is written and an older engine stays.
    """
    runtime = runtime or runtime_meta(plan.device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    label = f"torch-aot-{plan.precision}"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".aot-") as tmp:
        folder = Path(tmp)
        program, package = _export(model, plan, folder / aot_runtime.PROGRAM), folder / aot_runtime.PACKAGE
        _package(program, package, plan)
        reports: dict[str, ParityReport | str] = {}
        logits, why = aot_runtime.probe_package(package, plan.device, images, batch_size=min(64, plan.max_batch))
        reports["aoti"] = why or compare_logits(reference, logits, f"{label} (aoti)", min_top1_agreement, max_abs_diff)
        cache = b""
        aoti_failed = isinstance(reports["aoti"], str) or not reports["aoti"].passed
        if plan.fallback == "compile" or (plan.fallback == "on-failure" and aoti_failed):
            try:
                logits, cache = _compile_route(program, plan, images)
                reports["compile"] = compare_logits(
                    reference, logits, f"{label} (compile)", min_top1_agreement, max_abs_diff
                )
            except Exception as err:  # a compile that fails leaves the aoti route, if it passed
                reports["compile"] = f"torch.compile failed: {type(err).__name__}: {err}"
        route, fallback = choose_route(reports)
        if not fallback and plan.fallback == "compile" and route == "aoti":
            log.warning("%s: the compile route failed its gate (%s); no fallback", label, reports.get("compile"))
        report = reports[route]
        assert isinstance(report, ParityReport)
        engine = folder / out.name
        with zipfile.ZipFile(engine, "w", zipfile.ZIP_STORED) as zf:
            zf.write(package, aot_runtime.PACKAGE)
            zf.write(program, aot_runtime.PROGRAM)
            if cache:
                zf.writestr(aot_runtime.CACHE, cache)
        meta = EngineMeta(
            target="torch-aot",
            precision=plan.precision,
            onnx_sha256=onnx_sha256,
            runtime_version=runtime.runtime_version,
            device=runtime.device,
            compute_capability=runtime.compute_capability,
            profile={"min": 1, "max": plan.max_batch},
            vitops_version=vitops_version(),
            created=utc_now(),
            extra={
                **runtime.extra,
                "route": route,
                "fallback": fallback,
                "routes": {r: v if isinstance(v, str) else v.as_dict() for r, v in reports.items()},
                "parity": report.as_dict(),
                "input_chw": list(plan.input_chw),
                "max_batch": plan.max_batch,
                "note": plan.note,
                "compile_cache_bytes": len(cache),
            },
        )
        atomic_copy(engine, out)
        write_meta(out, meta)
    log.info("%s: serving by %s (fallback %s); %s", label, route, fallback or "none", report.describe())
    return out, report


def load_aot_engine(
    path: Path, runtime: EngineMeta | None = None, route: str = "auto", probe: bool = True
) -> aot_runtime.AotEngine:
    """Check an engine's metadata against this machine, then open it (`aot_runtime.open_engine`): a callable on
    float32 `N, C, H, W` tensors returning float32 logits on the engine's device.

    Raises:
        EngineMismatchError: built for another torch, CUDA version, GPU or CPU; nothing is loaded.
    """
    meta = read_meta(Path(path))
    check_compatible(meta, runtime or runtime_meta(str(meta.extra.get("device_type", "cpu"))), path)
    return aot_runtime.open_engine(path, asdict(meta), route=route, probe=probe)


# --- the torch calls ------------------------------------------------------------------------------------


def _export(model: Any, plan: AotPlan, program: Path) -> Path:
    """torch.export of a copy of `model` cast to the plan's precision, batch dynamic from 1 to `max_batch`; saved."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[plan.precision]

    class Cast(torch.nn.Module):
        """float32 images in, float32 logits out, whatever the precision inside."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.to(dtype)).float()

    net = Cast(copy.deepcopy(model).eval().to(plan.device, dtype)).eval()
    example = torch.zeros((2, *plan.input_chw), device=plan.device)  # 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=plan.max_batch)
    with torch.no_grad():
        exported = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(exported, str(program))
    return program


def _package(program: Path, package: Path, plan: AotPlan) -> Path:
    """AOTInductor's package of the exported program (minutes for a ViT-B/16 on a GPU, ~30 s for a tiny ViT on CPU)."""
    import torch

    log.info("compiling the torch-aot %s package for %s (AOTInductor)", plan.precision, plan.device)
    return Path(torch._inductor.aoti_compile_and_package(torch.export.load(str(program)), package_path=str(package)))


def _compile_route(program: Path, plan: AotPlan, images: np.ndarray) -> tuple[np.ndarray, bytes]:
    """The compile route's logits on the parity images, and the cache artifacts of its compile."""
    import torch

    run = aot_runtime.compile_program(program, plan.device)

    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return run(torch.from_numpy(batch).to(plan.device)).float().cpu().numpy()

    got = run_batched(logits, np.ascontiguousarray(images, np.float32), min(64, plan.max_batch))
    saved = torch.compiler.save_cache_artifacts()
    return got, bytes(saved[0]) if saved else b""
