"""Engine metadata beside each engine file, compatibility checks before loading, atomic writes, timing cache.

An engine is only valid for the runtime that built it: a TensorRT plan is tied to the TensorRT version and
the GPU (name and compute capability); an ONNX Runtime engine saved after hardware-specific graph
optimisations is tied to the CPU's instruction set. Every engine `X` therefore has `X.json` beside it,
written by the build, and `check_compatible` refuses to load an engine whose metadata does not match the
runtime in use. All files are written atomically (temp file in the same folder, then `os.replace`), so an
interrupted build leaves the previous good engine, or nothing, but never a partial file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_bytes

META_SUFFIX = ".json"


class EngineMismatchError(RuntimeError):
    """An engine built for another runtime (TensorRT version, GPU, CPU); the message says what to rebuild."""


@dataclass
class EngineMeta:
    """What an engine was built from and for.

    Attributes:
        target: `tensorrt`, `torch-aot`, `onnxruntime` or `openvino`.
        precision: `fp32`, `fp16`, `int8` (TensorRT), `fp16`, `bf16`, `fp32` (torch-aot), `fp32`, `int8-static`,
            `int8-dynamic` (ONNX Runtime) or `fp32`, `bf16`, `int8` (OpenVINO).
        onnx_sha256: hash of the ONNX file the engine was built from (torch-aot: the export of the same weights).
        runtime_version: TensorRT, torch, ONNX Runtime or OpenVINO version that built it.
        device: GPU name (TensorRT, torch-aot on CUDA) or CPU model name.
        compute_capability: `major.minor` of the GPU; empty for CPU engines.
        profile: batch sizes `{"min": .., "opt": .., "max": ..}` of the optimization profile (TensorRT) or of the
            dynamic batch (torch-aot).
        vitops_version: version of this package that built it.
        created: UTC timestamp of the build.
        extra: build settings and parity results.
    """

    target: str
    precision: str
    onnx_sha256: str
    runtime_version: str
    device: str
    compute_capability: str = ""
    profile: dict[str, int] = field(default_factory=dict)
    vitops_version: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def meta_path(engine_path: Path) -> Path:
    """The metadata file that belongs to `engine_path` (`<engine>.json`)."""
    return Path(str(engine_path) + META_SUFFIX)


def vitops_version() -> str:
    """Installed version of vitops, or `unknown` when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vitops")
    except PackageNotFoundError:
        return "unknown"


def write_meta(engine_path: Path, meta: EngineMeta) -> Path:
    """Write `<engine>.json` atomically."""
    text = json.dumps(asdict(meta), indent=2, sort_keys=True)
    return atomic_write_bytes(meta_path(engine_path), text.encode("utf-8"))


def read_meta(engine_path: Path) -> EngineMeta:
    """Read the metadata of an engine.

    Raises:
        EngineMismatchError: when it is missing or unreadable (the engine cannot be trusted).
    """
    path = meta_path(engine_path)
    if not path.is_file():
        raise EngineMismatchError(f"{engine_path}: no metadata file {path.name}; rebuild it with `vitops build`")
    try:
        return EngineMeta(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as err:
        raise EngineMismatchError(f"{path}: unreadable engine metadata ({err}); rebuild with `vitops build`") from err


def check_compatible(meta: EngineMeta, runtime: EngineMeta, engine_path: Path | str = "engine") -> None:
    """Refuse an engine whose build runtime differs from the runtime about to load it.

    For TensorRT the runtime version, GPU name and compute capability must all match (a plan file is not
    portable across any of them). For torch-aot the torch version and device type must match, and on CUDA the
    GPU, compute capability and CUDA version, on a CPU its name and ISA (an AOTInductor package is compiled code
    for them). For OpenVINO the version, the CPU name and its ISA (AVX-512, AMX-BF16, AMX-INT8, ...) must match:
    the precision and the kernels an engine was gated with depend on them. For ONNX Runtime only the target is
    checked: ORT files are portable ONNX, optimised at the portable `extended` level.

    Args:
        meta: metadata read beside the engine.
        runtime: the same fields describing the runtime in use (`deploy.tensorrt.runtime_meta`,
            `deploy.openvino.runtime_meta`).
        engine_path: named in the error.

    Raises:
        EngineMismatchError: naming every field that differs and how to fix it.
    """
    if meta.target != runtime.target:
        raise EngineMismatchError(f"{engine_path}: built for {meta.target}, cannot load with {runtime.target}")
    if meta.target == "openvino":
        diffs = [
            f"{label} {have!r} (engine) != {want!r} (this machine)"
            for label, have, want in (
                ("OpenVINO version", meta.runtime_version, runtime.runtime_version),
                ("CPU", meta.device, runtime.device),
                ("ISA", meta.extra.get("isa"), runtime.extra.get("isa")),
            )
            if have != want
        ]
        if diffs:
            raise EngineMismatchError(
                f"{engine_path}: OpenVINO engine does not match this machine: {'; '.join(diffs)}. Its kernels and "
                "precision were chosen for that CPU and OpenVINO version: rebuild it here with "
                "`vitops build --target openvino`."
            )
        return
    if meta.target == "torch-aot":
        from vitops.deploy.aot_runtime import engine_fields, mismatches

        diffs = mismatches(engine_fields(asdict(meta)), engine_fields(asdict(runtime)))
        if diffs:
            raise EngineMismatchError(
                f"{engine_path}: torch-aot engine does not match this machine: {'; '.join(diffs)}. An AOTInductor "
                "package is compiled for one torch version and device: rebuild it here with "
                "`vitops build --target torch-aot`."
            )
        return
    if meta.target != "tensorrt":
        return
    diffs = [
        f"{label} {have!r} (engine) != {want!r} (this machine)"
        for label, have, want in (
            ("TensorRT version", meta.runtime_version, runtime.runtime_version),
            ("GPU", meta.device, runtime.device),
            ("compute capability", meta.compute_capability, runtime.compute_capability),
        )
        if have != want
    ]
    if diffs:
        raise EngineMismatchError(
            f"{engine_path}: TensorRT engine does not match this machine: {'; '.join(diffs)}. "
            "A TensorRT engine only runs on the TensorRT version and GPU that built it: "
            "rebuild it here with `vitops build --target tensorrt`."
        )


def load_timing_cache(path: Path) -> bytes:
    """The saved TensorRT timing cache, or empty bytes when there is none yet (or it is unreadable)."""
    path = Path(path).expanduser()
    try:
        return path.read_bytes()
    except OSError:
        return b""


def save_timing_cache(path: Path, data: bytes) -> Path | None:
    """Save a TensorRT timing cache atomically, so concurrent or interrupted builds never corrupt it."""
    if not data:
        return None
    return atomic_write_bytes(Path(path).expanduser(), bytes(data))


# Engine files under the engine folder, one subfolder per target (each a DVC output of its own). OpenVINO
# engines are an IR (xml + bin) in one uncompressed zip per precision; torch-aot engines an AOTInductor package and
# the exported program in one (deploy/aot_runtime.py), for the device they were built on (their metadata says which).
ENGINE_FILES = {
    "onnxruntime-fp32": "onnxruntime/fp32.onnx",
    "onnxruntime-int8": "onnxruntime/int8.onnx",
    "openvino-fp32": "openvino/fp32.zip",
    "openvino-bf16": "openvino/bf16.zip",
    "openvino-int8": "openvino/int8.zip",
    "tensorrt-fp16": "tensorrt/fp16.engine",
    "tensorrt-int8": "tensorrt/int8.engine",
    "torch-aot-fp16": "torch-aot/fp16.zip",
    "torch-aot-bf16": "torch-aot/bf16.zip",
    "torch-aot-fp32": "torch-aot/fp32.zip",
}


def engine_files(root: Path) -> dict[str, Path]:
    """Backend name -> engine file, for every engine the folder `root` can hold."""
    return {backend: Path(root) / rel for backend, rel in ENGINE_FILES.items()}
