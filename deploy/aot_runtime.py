"""Opening and running a torch-aot engine, checking it against this machine, and preprocessing images on its device.

Self-contained (the standard library and numpy; torch inside the functions that need it): the served pyfunc
model ships this file as code beside `flows/pyfunc_model.py` and runs engines with it without vitops, and
`deploy/torch_aot.py`, which builds the engines, uses it too.

A torch-aot engine is one uncompressed zip (published with one atomic rename, like every engine):

- `model.pt2`: the AOTInductor package of the exported model (`torch._inductor.aoti_compile_and_package`);
- `program.pt2`: the exported program itself (`torch.export.save`), for the second route;
- `compile-cache.bin`: torch.compile's cache artifacts from the build (`torch.compiler.save_cache_artifacts`).

Two routes run it; the engine's metadata names the one that passed its gate (`route`) and the other (`fallback`):

- `aoti`: `torch._inductor.aoti_load_package`. On an H200 with torch 2.11 loading a ViT-B/16 FP16 package
  crashed the process (segfault) before any inference, so a package is first loaded and run in a child process
  (`probe_package`): a crash costs the child, not the build or the server, which then takes the next route.
- `compile`: the exported program through `torch.compile` (`reduce-overhead`: CUDA graphs, on CUDA), with the
  build's cache loaded first so that a station does not pay the whole compile again.

Inputs and outputs are float32 `N, 3, H, W` and `N, classes` whatever the engine's precision: the casts are
inside the exported graph. `python aot_runtime.py probe ...` is the child process of `probe_package`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE, PROGRAM, CACHE = "model.pt2", "program.pt2", "compile-cache.bin"  # members of the engine zip
ROUTES = ("aoti", "compile")
PROBE_TIMEOUT_S = 600.0
# /proc/cpuinfo flag -> name: what decides the kernels a CPU package was compiled with (deploy.openvino.ISA_FLAGS;
# a test keeps the copies equal).
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)
# What must match between the machine that built an engine and the one that loads it, per device type.
CHECKED = {
    "cuda": (("torch", "torch version"), ("device", "GPU"), ("compute_capability", "compute capability"),
             ("cuda", "CUDA version")),
    "cpu": (("torch", "torch version"), ("device", "CPU"), ("isa", "ISA")),
}  # fmt: skip
_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}  # PIL name -> torch mode


class AotUnavailable(RuntimeError):
    """This machine cannot run the engine (no torch, no CUDA device, another GPU or torch); the message says why."""


def _cpu_info() -> tuple[str, list[str]]:
    name, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    import platform

    return name or platform.processor() or platform.machine(), [label for f, label in ISA_FLAGS if f in set(flags)]


def machine(device_type: str) -> dict[str, Any]:
    """This machine's fields that an engine for `device_type` (`cuda` or `cpu`) must match.

    Raises:
        AotUnavailable: `cuda` without a CUDA device, or torch is missing.
    """
    try:
        import torch
    except ImportError as err:
        raise AotUnavailable(f"torch is not installed ({err})") from err
    fields: dict[str, Any] = {"device_type": device_type, "torch": torch.__version__}
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise AotUnavailable("it runs on CUDA and this machine has no CUDA device")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return fields | {
            "device": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda or "",
        }
    name, isa = _cpu_info()
    return fields | {"device": name, "isa": isa}


def engine_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The same fields read from an engine's metadata (`deploy.engine_meta.EngineMeta` as a dict)."""
    extra = meta.get("extra") or {}
    return {
        "device_type": extra.get("device_type"),
        "torch": meta.get("runtime_version"),
        "device": meta.get("device"),
        "compute_capability": meta.get("compute_capability"),
        "cuda": extra.get("cuda"),
        "isa": extra.get("isa"),
    }


def mismatches(built: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Each field that differs between the engine's machine and this one: `GPU 'A' (engine) != 'B' (this machine)`."""
    if built.get("device_type") != here.get("device_type"):
        return [f"device type {built.get('device_type')!r} (engine) != {here.get('device_type')!r} (this machine)"]
    return [
        f"{label} {built.get(key)!r} (engine) != {here.get(key)!r} (this machine)"
        for key, label in CHECKED.get(str(built.get("device_type")), ())
        if built.get(key) != here.get(key)
    ]


class AotEngine:
    """A loaded torch-aot engine: `engine(x)` runs a float32 `N, 3, H, W` tensor on the engine's device and returns
    float32 logits there.

    Attributes:
        route: `aoti` or `compile`.
        device: `cuda` or `cpu`.
        notes: why earlier routes were not taken (e.g. the package crashed its probe).
    """

    def __init__(self, fn: Callable[[Any], Any], route: str, device: str, notes: list[str], keep: Any) -> None:
        self._fn, self.route, self.device, self.notes = fn, route, device, notes
        self._keep = keep  # the extracted files live as long as the engine

    def __call__(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self._fn(x.to(self.device, torch.float32, non_blocking=True))


def open_engine(path: Path | str, meta: Mapping[str, Any], route: str = "auto", probe: bool = True) -> AotEngine:
    """Check an engine against this machine and open it by the route its metadata names, else by its fallback.

    Args:
        path: the engine zip.
        meta: its metadata (`<engine>.json`).
        route: `auto` (the metadata's `route`, then its `fallback`), `aoti` or `compile`.
        probe: load an `aoti` package in a child process first (see `probe_package`).

    Raises:
        AotUnavailable: the engine was built for another machine, or no route opened.
    """
    extra = meta.get("extra") or {}
    device = str(extra.get("device_type") or "cpu")
    diffs = mismatches(engine_fields(meta), machine(device))
    if diffs:
        raise AotUnavailable(f"built for another machine: {'; '.join(diffs)}; rebuild it here")
    tmp = tempfile.TemporaryDirectory(prefix="vitops-aot-")
    folder = Path(tmp.name)
    with zipfile.ZipFile(path) as zf:
        for name in (PACKAGE, PROGRAM, CACHE):
            if name in zf.namelist():
                zf.extract(name, folder)
    routes = [route] if route != "auto" else [r for r in (extra.get("route"), extra.get("fallback")) if r in ROUTES]
    notes: list[str] = []
    for name in routes:
        if name == "aoti" and (folder / PACKAGE).is_file():
            if probe:
                shape = (1, *extra.get("input_chw", (3, 224, 224)))
                _, why = probe_package(folder / PACKAGE, device, np.zeros(shape, np.float32))
                if why:
                    notes.append(f"aoti: {why}")
                    continue
            return AotEngine(load_package(folder / PACKAGE, device), "aoti", device, notes, tmp)
        if name == "compile" and (folder / PROGRAM).is_file():
            cache = (folder / CACHE).read_bytes() if (folder / CACHE).is_file() else b""
            return AotEngine(compile_program(folder / PROGRAM, device, cache), "compile", device, notes, tmp)
        notes.append(f"{name}: not in the engine")
    tmp.cleanup()
    raise AotUnavailable(f"{path}: no route opened ({'; '.join(notes) or 'none named in its metadata'})")


def load_package(package: Path, device: str) -> Callable[[Any], Any]:
    """The AOTInductor package loaded in this process (call `probe_package` first: a crash here is this process)."""
    import torch

    runner = torch._inductor.aoti_load_package(str(package))
    return lambda x: runner(x)


def compile_program(program: Path, device: str, cache: bytes = b"") -> Callable[[Any], Any]:
    """The exported program through torch.compile (CUDA graphs on CUDA), after loading the build's cache artifacts."""
    import torch

    if cache:
        torch.compiler.load_cache_artifacts(cache)
    module = torch.export.load(str(program)).module()
    if device == "cpu":
        return torch.compile(module)
    compiled = torch.compile(module, mode="reduce-overhead")

    def run(x: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x).clone()  # CUDA graph outputs are overwritten by the next call

    return run


def probe_package(
    package: Path, device: str, images: np.ndarray, timeout_s: float = PROBE_TIMEOUT_S, batch_size: int = 64
) -> tuple[np.ndarray | None, str]:
    """Load an AOTInductor package and run `images` through it in a child process.

    Returns:
        The logits and "" when it ran, else None and why not (e.g. `the child process died of SIGSEGV`).
    """
    with tempfile.TemporaryDirectory(prefix="vitops-aot-probe-") as tmp:
        inputs, outputs = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(inputs, np.ascontiguousarray(images, np.float32))
        # -P: the folder of this file (deploy/ holds a tensorrt.py and an openvino.py) must not shadow packages
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "probe", str(package), device, str(inputs)]
        try:
            proc = subprocess.run(
                [*cmd, str(outputs), str(batch_size)], capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return None, f"loading the package took over {timeout_s:g} s in a child process"
        if proc.returncode != 0:
            tail = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[-1][-300:]
            return None, f"loading the package {exit_reason(proc.returncode)} in a child process {tail}".strip()
        return np.load(outputs), ""


def exit_reason(returncode: int) -> str:
    """`died of SIGSEGV` for a signal (negative code, or 128 + signal from a shell), else `exited with N`."""
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return f"died of {signal.Signals(number).name}" if number else f"exited with {returncode}"
    except ValueError:
        return f"exited with {returncode}"


def _probe_main(argv: Sequence[str]) -> int:
    package, device, inputs, outputs, batch_size = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    import torch

    run = load_package(Path(package), device)
    images = torch.from_numpy(np.load(inputs))
    with torch.inference_mode():
        logits = [run(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    np.save(outputs, torch.cat(logits).numpy())
    return 0


# --- preprocessing on the engine's device ------------------------------------------------------------------


def eval_sizes(img_size: int, crop_pct: float | None) -> tuple[int, int]:
    """The side the shorter image side is resized to and the centre crop, as timm's eval transform has them."""
    import math

    return math.floor(img_size / (crop_pct or 0.875)), img_size


def resized(h: int, w: int, short: int) -> tuple[int, int]:
    """Height and width after resizing the shorter side to `short` (torchvision's Resize(int))."""
    return (int(short * h / w), short) if w <= h else (short, int(short * w / h))


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    img_size: int,
    crop_pct: float | None,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
    device: str,
) -> Any:
    """timm's eval transform on `device`: the uint8 `H, W, 3` images (or one `N, H, W, 3` array) are uploaded as they
    are (those of one size together), resized (shorter side, antialiased, rounded to uint8 levels as PIL does),
    centre-cropped (zero-padded when smaller), scaled to [0, 1] and normalised; returns a float32
    `N, 3, img_size, img_size` tensor there. Equal to `flows/pyfunc_model.py`'s PIL preprocessing within two uint8
    levels per pixel.

    Raises:
        ValueError: an interpolation torch has no PIL-equivalent for (box, hamming, lanczos): preprocess on the CPU.
    """
    import torch

    if interpolation not in _MODES:
        raise ValueError(f"no {interpolation} resize on the device; preprocess on the CPU")
    mode = _MODES[interpolation]
    short, size = eval_sizes(img_size, crop_pct)
    out = torch.empty((len(images), 3, size, size), device=device, dtype=torch.float32)
    batch = images if isinstance(images, np.ndarray) and images.ndim == 4 else None  # one array: one upload, no copy
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images if batch is None else []):
        groups.setdefault(tuple(np.shape(image)), []).append(i)
    if batch is not None:
        groups[tuple(batch.shape[1:])] = list(range(len(batch)))
    for shape, index in groups.items():
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"expected uint8 RGB images H,W,3; got shape {shape}")
        if batch is not None:
            stacked = batch
        else:
            stacked = np.stack([np.asarray(images[i]) for i in index]) if len(index) > 1 else images[index[0]][None]
        with warnings.catch_warnings():  # PIL's arrays are read-only; the tensor is only read, never written
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(stacked, np.uint8))
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
        target = resized(shape[0], shape[1], short)
        if target != shape[:2]:
            x = _center_crop(_resize(x.float(), target, mode), size)
        else:
            x = _center_crop(x, size).float()  # cropped as uint8: a quarter of the bytes to convert
        if len(index) == len(images):
            out.copy_(x)
        else:
            out[torch.tensor(index, device=device)] = x
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    return out.sub_(torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0).div_(scale)


def _resize(x: Any, size: tuple[int, int], mode: str) -> Any:
    """PIL's resize of a uint8 image, on float values: nearest by PIL's own source indices; bilinear and bicubic
    antialiased, width first, then height, rounding to uint8 levels after each pass as PIL does (its bicubic
    overshoots are clipped between the passes)."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if mode == "nearest-exact":
        # PIL (ImagingScaleAffine) steps from the first pixel centre by adding n / m in doubles, then truncates
        rows, cols = (
            torch.from_numpy(np.minimum(np.cumsum(np.r_[0.5 * n / m, np.full(m - 1, n / m)]).astype(np.int64), n - 1))
            for n, m in ((h, size[0]), (w, size[1]))
        )
        rows, cols = rows.to(x.device), cols.to(x.device)
        return x.index_select(-2, rows).index_select(-1, cols)
    if w != size[1]:
        x = F.interpolate(x, size=(h, size[1]), mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
    if h != size[0]:
        x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
    return x


def _center_crop(x: Any, size: int) -> Any:
    # torchvision's CenterCrop (as flows/pyfunc_model.py writes it with PIL): zero padding when smaller, then
    # round((side - size) / 2).
    h, w = x.shape[-2:]
    if h < size or w < size:
        canvas = x.new_zeros((*x.shape[:-2], max(h, size), max(w, size)))
        top, left = (size - h) // 2 if size > h else 0, (size - w) // 2 if size > w else 0
        canvas[..., top : top + h, left : left + w] = x
        x, (h, w) = canvas, canvas.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


class HostRunner:
    """An engine behind host arrays, for serving: `runner(batch)` takes a preprocessed float32 `N, 3, H, W` batch,
    `runner.classify_images(images)` uint8 `H, W, 3` images preprocessed on the engine's device; both return float32
    logits in host memory.

    Args:
        engine: from `open_engine`.
        model_meta: the model's `model.json` (img_size, crop_pct, interpolation, mean, std).
    """

    def __init__(self, engine: AotEngine, model_meta: Mapping[str, Any]) -> None:
        self.engine, self.meta = engine, model_meta

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self.engine(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).float().cpu().numpy()

    def classify_images(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        m = self.meta
        x = preprocess(
            images, int(m["img_size"]), m.get("crop_pct"), m.get("interpolation", "bicubic"), m["mean"], m["std"],
            self.engine.device,
        )  # fmt: skip
        return self.engine(x).float().cpu().numpy()


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    sys.exit(_probe_main(sys.argv[2:]))
