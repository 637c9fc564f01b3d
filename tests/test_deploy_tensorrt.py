"""TensorRT build logic (target/precision choice, FP32 pinning, profile, metadata checks, timing cache,
atomic writes) with the few tensorrt calls replaced by fakes; the real build runs only on a CUDA machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitops.common.files import atomic_write_bytes
from vitops.deploy import tensorrt as trt_mod
from vitops.deploy.engine_meta import (
    EngineMeta,
    EngineMismatchError,
    check_compatible,
    meta_path,
    read_meta,
    save_timing_cache,
)
from vitops.deploy.tensorrt import (
    TensorRTUnavailable,
    TrtPlan,
    build_trt_engine,
    builder_flags,
    choose_precision,
    choose_target,
    layers_to_pin_fp32,
    profile_shapes,
    tensorrt_status,
)


def runtime(version: str = "10.7.0", gpu: str = "NVIDIA H100 80GB HBM3", cc: str = "9.0") -> EngineMeta:
    return EngineMeta("tensorrt", "", "", version, gpu, cc)


def plan(precision: str = "fp16") -> TrtPlan:
    return TrtPlan(precision, "input", (3, 32, 32), {"min": 1, "opt": 8, "max": 64}, flags=builder_flags(precision))


@pytest.fixture()
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not really onnx, only hashed")
    return path


@pytest.fixture()
def fake_build(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replaces the tensorrt calls: records the timing cache each build was given, returns a grown cache."""
    seen: list[bytes] = []

    def _trt_build(onnx_path: Path, plan: TrtPlan, cache: bytes) -> tuple[bytes, bytes, list[str]]:
        seen.append(cache)
        return b"ENGINE" * 1000, cache + b"+tactics", ["blocks.0.norm1"]

    monkeypatch.setattr(trt_mod, "_trt_build", _trt_build)
    return seen


def test_auto_target_falls_back_to_the_cpu_engines_with_a_visible_reason() -> None:
    target, message = choose_target("auto", False, "no CUDA device")
    assert target == "cpu" and "TensorRT skipped (no CUDA device); building the CPU engines" in message
    assert choose_target("auto", True) == ("tensorrt", "")
    assert choose_target("onnxruntime", True) == ("onnxruntime", "")
    assert choose_target("openvino", True) == ("openvino", "")
    with pytest.raises(TensorRTUnavailable, match="no CUDA device.*--target onnxruntime"):
        choose_target("tensorrt", False, "no CUDA device")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on machines without CUDA")
def test_status_without_cuda_names_the_reason() -> None:
    assert tensorrt_status() == (False, "no CUDA device")


@pytest.mark.parametrize(
    ("requested", "cc", "chosen"),
    [
        ("fp16", "8.6", "fp16"),
        ("int8", "9.0", "int8"),
        ("fp16", "6.1", "fp32"),
        ("int8", "6.0", "fp16"),
        ("int8", "5.2", "fp32"),
        ("fp32", "9.0", "fp32"),
    ],
)
def test_precision_falls_back_to_what_the_gpu_runs_fast(requested: str, cc: str, chosen: str) -> None:
    got, note = choose_precision(requested, cc)
    assert got == chosen
    assert bool(note) == (got != requested)


def test_reduced_precision_obeys_the_fp32_pins() -> None:
    assert builder_flags("fp32") == []
    assert builder_flags("fp16") == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert set(builder_flags("int8")) == {"INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"}


def test_profile_shapes_and_their_order() -> None:
    assert profile_shapes((3, 224, 224), {"min": 1, "opt": 8, "max": 64}) == (
        (1, 3, 224, 224),
        (8, 3, 224, 224),
        (64, 3, 224, 224),
    )
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes((3, 32, 32), {"min": 8, "opt": 4, "max": 64})


def test_layernorm_softmax_and_reductions_are_pinned_to_fp32() -> None:
    layers = [
        ("/blocks.0/norm1/LayerNormalization", "NORMALIZATION"),
        ("/blocks.0/attn/Softmax", "SOFTMAX"),
        ("/blocks.0/attn/qkv/MatMul", "MATRIX_MULTIPLY"),
        ("/blocks.0/mlp/fc1/MatMul", "MATRIX_MULTIPLY"),
        ("/blocks.0/mlp/act/Erf", "UNARY"),
        ("/norm/ReduceMean", "REDUCE"),
        ("/norm/Pow", "ELEMENTWISE"),  # LayerNorm exported as primitive ops (opset < 17)
        ("/norm/Sqrt", "UNARY"),
        ("/blocks.0/Add", "ELEMENTWISE"),
        ("/norm/Shape", "SHAPE"),
    ]
    assert layers_to_pin_fp32(layers) == [
        "/blocks.0/norm1/LayerNormalization",
        "/blocks.0/attn/Softmax",
        "/norm/ReduceMean",
        "/norm/Pow",
        "/norm/Sqrt",
    ]


def test_make_plan_reads_the_input_from_the_onnx_file(tmp_path: Path) -> None:
    import torch

    from vitops.deploy.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, 8), torch.nn.Flatten(), torch.nn.Linear(64, 5))
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", exporter="torchscript").path
    made = trt_mod.make_plan(path, "int8", {"min": 1, "opt": 4, "max": 16}, "7.5")
    assert (made.precision, made.input_name, made.input_chw) == ("int8", "input", (3, 32, 32))
    assert made.flags == builder_flags("int8")
    assert trt_mod.make_plan(path, "fp16", {"min": 1, "opt": 4, "max": 16}, "6.1").precision == "fp32"


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (runtime(version="10.3.0"), "TensorRT version"),
        (runtime(gpu="NVIDIA A10G"), "GPU"),
        (runtime(cc="8.6"), "compute capability"),
    ],
)
def test_engine_for_another_runtime_is_refused(other: EngineMeta, field: str) -> None:
    built = runtime()
    with pytest.raises(EngineMismatchError, match=f"{field}.*rebuild it here"):
        check_compatible(built, other, "trt_fp16.engine")
    check_compatible(built, runtime(), "trt_fp16.engine")  # same machine: fine


def test_mismatched_engine_is_not_loaded(
    tmp_path: Path, onnx_file: Path, fake_build: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tmp_path / "trt_fp16.engine"
    build_trt_engine(onnx_file, engine, plan(), tmp_path / "cache", runtime())

    def must_not_load(data: bytes) -> None:
        raise AssertionError("a mismatched engine was deserialized")

    monkeypatch.setattr(trt_mod, "_trt_runner", must_not_load)
    with pytest.raises(EngineMismatchError, match="'10.7.0' \\(engine\\) != '10.8.0' \\(this machine\\)"):
        trt_mod.load_trt_engine(engine, runtime(version="10.8.0"))
    meta_path(engine).unlink()
    with pytest.raises(EngineMismatchError, match="no metadata file"):
        trt_mod.load_trt_engine(engine, runtime())


def test_build_writes_engine_metadata_and_reuses_the_timing_cache(
    tmp_path: Path, onnx_file: Path, fake_build: list[bytes]
) -> None:
    cache = tmp_path / "cache" / "trt-timing.cache"
    first = build_trt_engine(onnx_file, tmp_path / "a.engine", plan(), cache, runtime())
    second = build_trt_engine(onnx_file, tmp_path / "b.engine", plan(), cache, runtime())
    assert fake_build == [b"", b"+tactics"]  # the second build got the first one's cache
    assert cache.read_bytes() == b"+tactics+tactics"
    assert not first.extra["timing_cache_reused"] and second.extra["timing_cache_reused"]
    meta = read_meta(tmp_path / "a.engine")
    assert (meta.runtime_version, meta.device, meta.compute_capability) == ("10.7.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert meta.precision == "fp16" and meta.profile == {"min": 1, "opt": 8, "max": 64}
    assert len(meta.onnx_sha256) == 64 and meta.vitops_version
    assert (tmp_path / "a.engine").read_bytes() == b"ENGINE" * 1000


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_no_partial_engine(
    tmp_path: Path, onnx_file: Path, fake_build: list[bytes], monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    engine = tmp_path / "trt_fp16.engine"
    engine.write_bytes(b"previous good engine")

    def half_then_fail(data: bytes):
        yield bytes(data[:100])
        raise error("interrupted while writing")

    monkeypatch.setattr(trt_mod, "_chunks", half_then_fail)
    with pytest.raises(error):
        build_trt_engine(onnx_file, engine, plan(), tmp_path / "cache", runtime())
    assert engine.read_bytes() == b"previous good engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "trt_fp16.engine"]


def test_interrupted_build_leaves_no_engine(tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trt_mod, "_trt_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_trt_engine(onnx_file, tmp_path / "new.engine", plan(), tmp_path / "cache", runtime())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_atomic_write_and_timing_cache_keep_old_content_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def fail(fh) -> None:
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert save_timing_cache(tmp_path / "empty.cache", b"") is None  # nothing to save: no file


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not tensorrt_status()[0], reason=f"TensorRT build needs CUDA + tensorrt: {tensorrt_status()[1]}")
def test_real_tensorrt_fp16_build_matches_pytorch(tmp_path: Path) -> None:
    import numpy as np
    import timm
    import torch

    from vitops.deploy.export import export_onnx
    from vitops.deploy.parity import torch_logits

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    onnx_path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx").path
    rt = trt_mod.runtime_meta()
    made = trt_mod.make_plan(onnx_path, "fp16", {"min": 1, "opt": 4, "max": 8}, rt.compute_capability, 1.0)
    engine = tmp_path / "trt_fp16.engine"
    build_trt_engine(onnx_path, engine, made, tmp_path / "cache", rt)
    run = trt_mod.load_trt_engine(engine, rt)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    got = run(torch.from_numpy(x)).cpu().numpy()
    np.testing.assert_allclose(got, torch_logits(model, x), atol=5e-2)
    assert (tmp_path / "cache").stat().st_size > 0
