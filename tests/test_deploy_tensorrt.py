"""TensorRT build logic (target/precision choice, the typed FP16 graph of a strongly typed network, profile,
metadata checks, timing cache, atomic writes) with the few tensorrt calls replaced by fakes; the typed graphs run
in ONNX Runtime; the real build runs only on a CUDA machine with tensorrt (skipped, visibly, elsewhere: no
TensorRT wheel installs in this workplace)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.engines import images, tiny_vit

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
    choose_precision,
    choose_target,
    profile_shapes,
    tensorrt_status,
    typed_onnx,
)


def runtime(version: str = "10.7.0", gpu: str = "NVIDIA H100 80GB HBM3", cc: str = "9.0") -> EngineMeta:
    return EngineMeta("tensorrt", "", "", version, gpu, cc)


def plan(precision: str = "fp16") -> TrtPlan:
    return TrtPlan(precision, "input", (3, 32, 32), {"min": 1, "opt": 8, "max": 64})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitops.deploy.export import export_onnx

    x = torch.from_numpy(images(2))
    return export_onnx(tiny_vit(), x, tmp_path_factory.mktemp("onnx") / "model.onnx", exporter="torchscript").path


@pytest.fixture()
def onnx_file(tmp_path: Path, exported: Path) -> Path:
    return Path(shutil.copy(exported, tmp_path / "model.onnx"))


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    return types | {i.name: i.data_type for i in inferred.initializer}


@pytest.fixture()
def fake_build(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replaces the tensorrt calls: records the timing cache each build was given, returns a grown cache; checks that
    TensorRT would parse a graph typed to the plan's precision."""
    seen: list[bytes] = []

    def _trt_build(onnx_path: Path, plan: TrtPlan, cache: bytes) -> tuple[bytes, bytes]:
        graph = onnx.load(str(onnx_path))
        types = _types(graph)
        matmuls = {types[n.input[0]] for n in graph.graph.node if n.op_type == "MatMul"}
        assert matmuls == {onnx.TensorProto.FLOAT16 if plan.precision == "fp16" else onnx.TensorProto.FLOAT}
        seen.append(cache)
        return b"ENGINE" * 1000, cache + b"+tactics"

    monkeypatch.setattr(trt_mod, "_trt_build", _trt_build)
    return seen


def test_auto_target_builds_the_gpu_engines_with_cuda_and_the_cpu_engines_without() -> None:
    target, message = choose_target("auto", False, "no CUDA device")
    assert target == "cpu" and "TensorRT skipped (no CUDA device); building the CPU engines" in message
    assert choose_target("auto", True, cuda=True) == ("gpu", "")  # TensorRT and torch-aot, the fastest served
    target, message = choose_target("auto", False, "the tensorrt package is not installed", cuda=True)
    assert target == "gpu" and message.endswith("not installed); building the torch-aot engine")
    assert choose_target("onnxruntime", True) == ("onnxruntime", "")
    assert choose_target("openvino", True) == ("openvino", "")
    assert choose_target("torch-aot", False, "no CUDA device") == ("torch-aot", "")
    assert choose_target("tensorrt", True) == ("tensorrt", "")
    with pytest.raises(TensorRTUnavailable, match="no CUDA device.*--target torch-aot, onnxruntime"):
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


def test_profile_shapes_and_their_order() -> None:
    assert profile_shapes((3, 224, 224), {"min": 1, "opt": 8, "max": 64}) == (
        (1, 3, 224, 224),
        (8, 3, 224, 224),
        (64, 3, 224, 224),
    )
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes((3, 32, 32), {"min": 8, "opt": 4, "max": 64})


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_the_fp16_graph_keeps_layernorm_and_softmax_in_fp32_and_runs_like_torch(exporter: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from vitops.deploy.export import export_onnx
    from vitops.deploy.parity import torch_logits

    model, x = tiny_vit(), images(16)
    src = export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "model.onnx", exporter=exporter).path
    typed, kept = typed_onnx(src, "fp16", tmp_path)
    graph = onnx.load(str(typed))
    types = _types(graph)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    by_op = Counter((n.op_type, types.get(n.input[0])) for n in graph.graph.node if n.input)
    assert by_op[("LayerNormalization", f32)] == 5 and by_op[("LayerNormalization", f16)] == 0
    assert by_op[("Softmax", f32)] == 2 and by_op[("Softmax", f16)] == 0
    assert by_op[("MatMul", f16)] >= 8 and by_op[("MatMul", f32)] == 0
    assert by_op[("Conv", f16)] == 1  # the patch embedding
    assert len(kept) == 7 and typed_onnx(src, "fp32", tmp_path) == (src, [])
    assert [types[i.name] for i in [*graph.graph.input, *graph.graph.output]] == [f32, f32]  # runners feed float32
    session = ort.InferenceSession(str(typed), providers=["CPUExecutionProvider"])
    got = session.run(None, {graph.graph.input[0].name: x})[0]
    expected = torch_logits(model, x)
    np.testing.assert_allclose(got, expected, atol=5e-2)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_the_int8_graph_keeps_its_qdq_in_fp32_around_fp16(tmp_path: Path, exported: Path) -> None:
    import onnxruntime as ort

    from vitops.deploy.onnxrt import QuantSettings, quantize_onnx
    from vitops.deploy.parity import torch_logits

    x = images(32)
    qdq = quantize_onnx(exported, tmp_path / "qdq.onnx", QuantSettings("static", activation_symmetric=True), x)
    typed, kept = typed_onnx(qdq, "int8", tmp_path)
    graph = onnx.load(str(typed))
    types = _types(graph)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(types[n.input[1]] == onnx.TensorProto.FLOAT for n in dq)  # FP32 scales (opset < 19)
    assert {n.op_type for n in graph.graph.node if n.name in kept} >= {"QuantizeLinear", "DequantizeLinear"}
    session = ort.InferenceSession(str(typed), providers=["CPUExecutionProvider"])
    got = session.run(None, {graph.graph.input[0].name: x})[0]
    assert (got.argmax(1) == torch_logits(tiny_vit(), x).argmax(1)).mean() >= 0.9


def test_make_plan_reads_the_input_from_the_onnx_file(tmp_path: Path) -> None:
    import torch

    from vitops.deploy.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, 8), torch.nn.Flatten(), torch.nn.Linear(64, 5))
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", exporter="torchscript").path
    made = trt_mod.make_plan(path, "int8", {"min": 1, "opt": 4, "max": 16}, "7.5")
    assert (made.precision, made.input_name, made.input_chw) == ("int8", "input", (3, 32, 32))
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
    assert meta.extra["strongly_typed"] and meta.extra["fp32_nodes"] == 7  # 5 LayerNorms, 2 softmaxes
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
