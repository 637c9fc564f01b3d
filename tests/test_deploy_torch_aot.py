"""torch-aot engines: device, precision and route decisions, refusal of engines built elsewhere, the child-process
probe of a package, atomic publishing with the torch calls replaced by fakes; a real AOTInductor build of a tiny
ViT on the CPU (slow: ~30 s) and on CUDA (gpu)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.engines import images, tiny_vit

from vitops.deploy import aot_runtime
from vitops.deploy import torch_aot as aot
from vitops.deploy.engine_meta import EngineMeta, EngineMismatchError, check_compatible, meta_path, read_meta
from vitops.deploy.parity import ParityError, compare_logits, torch_logits

H200 = {"device": "NVIDIA H200", "compute_capability": "9.0", "cuda": "13.0"}


def cuda_runtime(torch_version: str = "2.11.0+cu130", **fields: str) -> EngineMeta:
    f = H200 | fields
    return EngineMeta(
        "torch-aot", "", "", torch_version, f["device"], f["compute_capability"],
        extra={"device_type": "cuda", "cuda": f["cuda"], "isa": []},
    )  # fmt: skip


def cpu_plan(**kw) -> aot.AotPlan:
    return replace(aot.AotPlan("fp32", "cpu", (3, 32, 32), max_batch=8), **kw)


def test_device_and_precision_follow_the_machine() -> None:
    assert aot.choose_device("auto", cuda_available=True) == "cuda"
    assert aot.choose_device("auto", cuda_available=False) == "cpu"
    assert aot.choose_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(aot.AotUnavailable, match="no CUDA device"):
        aot.choose_device("cuda", cuda_available=False)
    assert aot.choose_precision("auto", "cuda") == ("fp16", "")
    assert aot.choose_precision("auto", "cpu") == ("fp32", "")
    assert aot.choose_precision("bf16", "cuda", bf16_supported=True) == ("bf16", "")
    precision, note = aot.choose_precision("bf16", "cuda", bf16_supported=False)
    assert precision == "fp16" and "no fast BF16" in note
    with pytest.raises(ValueError, match="use one of auto, fp16, bf16, fp32"):
        aot.choose_precision("int8", "cuda")


def _report(agreement: float, route: str = "aoti") -> object:
    reference = np.eye(4, dtype=np.float32) * 10
    candidate = reference.copy()
    if agreement < 1:
        candidate[0] = [0, 10, 0, 0]
    return compare_logits(reference, candidate, f"torch-aot-fp16 ({route})", 0.99)


def test_route_is_aoti_when_its_package_runs_and_compile_when_it_crashed() -> None:
    assert aot.choose_route({"aoti": _report(1.0), "compile": _report(1.0, "compile")}) == ("aoti", "compile")
    crashed = "loading the package died of SIGSEGV in a child process"
    assert aot.choose_route({"aoti": crashed, "compile": _report(1.0, "compile")}) == ("compile", "")
    assert aot.choose_route({"aoti": _report(1.0)}) == ("aoti", "")  # built without a fallback
    assert aot.choose_route({"aoti": _report(1.0), "compile": _report(0.75, "compile")}) == ("aoti", "")
    with pytest.raises(ParityError, match="aoti: loading the package died of SIGSEGV.*compile: .*75.00%"):
        aot.choose_route({"aoti": crashed, "compile": _report(0.75, "compile")})


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (cuda_runtime("2.12.0+cu130"), "torch version"),
        (cuda_runtime(device="NVIDIA H100 80GB HBM3"), "GPU"),
        (cuda_runtime(compute_capability="8.0"), "compute capability"),
        (cuda_runtime(cuda="12.8"), "CUDA version"),
    ],
)
def test_an_engine_built_for_another_gpu_or_torch_is_refused(other: EngineMeta, field: str) -> None:
    with pytest.raises(EngineMismatchError, match=f"{field} .*rebuild it here with `vitops build --target torch-aot`"):
        check_compatible(cuda_runtime(), other, "torch-aot/fp16.zip")
    check_compatible(cuda_runtime(), cuda_runtime(), "torch-aot/fp16.zip")  # same machine: fine
    cpu = EngineMeta("torch-aot", "", "", "2.11.0+cu130", "AMD EPYC", extra={"device_type": "cpu", "isa": ["AVX2"]})
    with pytest.raises(EngineMismatchError, match="device type 'cuda' \\(engine\\) != 'cpu'"):
        check_compatible(cuda_runtime(), cpu, "torch-aot/fp16.zip")
    with pytest.raises(EngineMismatchError, match="ISA \\['AVX2'\\] \\(engine\\) != \\['AVX2', 'AVX-512'\\]"):
        check_compatible(cpu, replace(cpu, extra={"device_type": "cpu", "isa": ["AVX2", "AVX-512"]}), "fp32.zip")


def test_the_runtime_names_this_cpus_isa_as_the_openvino_build_does() -> None:
    """aot_runtime ships with the pyfunc model and so carries its own copy of the ISA table."""
    from vitops.deploy.openvino import ISA_FLAGS, cpu_flags, cpu_isa

    assert aot_runtime.ISA_FLAGS == ISA_FLAGS
    assert aot_runtime.machine("cpu")["isa"] == cpu_isa(cpu_flags())
    if not torch.cuda.is_available():
        with pytest.raises(aot_runtime.AotUnavailable, match="runs on CUDA and this machine has no CUDA device"):
            aot_runtime.machine("cuda")


def test_probe_reports_a_package_that_cannot_load_without_taking_the_caller_down(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a package")
    logits, why = aot_runtime.probe_package(bad, "cpu", np.zeros((1, 3, 32, 32), np.float32), timeout_s=120)
    assert logits is None and why.startswith("loading the package exited with 1 in a child process")
    assert aot_runtime.exit_reason(-11) == "died of SIGSEGV"
    assert aot_runtime.exit_reason(139) == "died of SIGSEGV"  # a shell's 128 + 11
    assert aot_runtime.exit_reason(3) == "exited with 3"


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The torch calls replaced: the export and package write small files, the probe and the compile route return
    what the test sets (the aoti package crashing, as it did on the H200, by default)."""
    reference = torch_logits(tiny_vit(), images(8))
    state = {"probe": (None, "loading the package died of SIGSEGV in a child process"), "compile": reference}

    def _export(model, plan, program):
        program.write_bytes(b"exported program")
        return program

    def _package(program, package, plan):
        package.write_bytes(b"aoti package")
        return package

    def _compile_route(program, plan, images):
        if isinstance(state["compile"], Exception):
            raise state["compile"]
        return state["compile"], b"compile cache"

    monkeypatch.setattr(aot, "_export", _export)
    monkeypatch.setattr(aot, "_package", _package)
    monkeypatch.setattr(aot, "_compile_route", _compile_route)
    monkeypatch.setattr(aot_runtime, "probe_package", lambda *a, **k: state["probe"])
    state["reference"] = reference
    return state


def test_a_package_that_crashes_its_probe_is_served_by_the_gated_compile_route(tmp_path: Path, fakes: dict) -> None:
    out = tmp_path / "torch-aot" / "fp32.zip"
    runtime = replace(aot.runtime_meta("cpu"), runtime_version="2.11.0+cu130")
    path, report = aot.build_aot_engine(
        tiny_vit(), out, images(8), fakes["reference"], cpu_plan(), 0.99, 1e-3, onnx_sha256="ab" * 32, runtime=runtime
    )
    assert path == out and report.passed and report.engine == "torch-aot-fp32 (compile)"
    meta = read_meta(out)
    assert (meta.target, meta.precision, meta.runtime_version, meta.onnx_sha256) == (
        "torch-aot", "fp32", "2.11.0+cu130", "ab" * 32,
    )  # fmt: skip
    assert (meta.extra["route"], meta.extra["fallback"], meta.extra["device_type"]) == ("compile", "", "cpu")
    assert "SIGSEGV" in meta.extra["routes"]["aoti"] and meta.extra["routes"]["compile"]["passed"]
    assert meta.profile == {"min": 1, "max": 8} and meta.extra["input_chw"] == [3, 32, 32]
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted([aot_runtime.PACKAGE, aot_runtime.PROGRAM, aot_runtime.CACHE])
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp32.zip", "fp32.zip.json"]


def test_a_failed_gate_leaves_the_older_engine_and_no_temporary_files(tmp_path: Path, fakes: dict) -> None:
    out = tmp_path / "fp32.zip"
    out.write_bytes(b"previous good engine")
    meta_path(out).write_text(json.dumps({"target": "torch-aot"}))
    wrong = fakes["reference"].copy()
    wrong[:, [0, 1]] = wrong[:, [1, 0]]  # every top-1 moves
    fakes["compile"] = wrong
    with pytest.raises(ParityError, match="aoti: loading the package died of SIGSEGV.*compile: .*top-1 agreement"):
        aot.build_aot_engine(tiny_vit(), out, images(8), fakes["reference"], cpu_plan(), 0.99)
    fakes["compile"] = RuntimeError("inductor failed")
    with pytest.raises(ParityError, match="compile: torch.compile failed: RuntimeError: inductor failed"):
        aot.build_aot_engine(tiny_vit(), out, images(8), fakes["reference"], cpu_plan(), 0.99)
    assert out.read_bytes() == b"previous good engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.zip", "fp32.zip.json"]


def test_without_a_fallback_the_aoti_route_alone_is_gated(tmp_path: Path, fakes: dict) -> None:
    fakes["probe"] = (fakes["reference"], "")
    fakes["compile"] = AssertionError("the compile route must not be built")
    aot.build_aot_engine(tiny_vit(), tmp_path / "fp32.zip", images(8), fakes["reference"], cpu_plan(fallback="none"))
    meta = read_meta(tmp_path / "fp32.zip")
    assert (meta.extra["route"], meta.extra["fallback"], list(meta.extra["routes"])) == ("aoti", "", ["aoti"])
    with zipfile.ZipFile(tmp_path / "fp32.zip") as zf:
        assert aot_runtime.CACHE not in zf.namelist()


def _check_engine(model: torch.nn.Module, path: Path, device: str, atol: float) -> None:
    """Both routes of a real engine run batches of 1 and 5 (a dynamic batch) like the model."""
    x = images(5, seed=7)
    expected = torch_logits(model, x)
    served = read_meta(path).extra["route"]
    for route in ("auto", "compile"):
        engine = aot.load_aot_engine(path, route=route)
        assert engine.route == (served if route == "auto" else "compile") and engine.device == device
        for batch in (x[:1], x):
            got = engine(torch.from_numpy(batch)).float().cpu().numpy()
            np.testing.assert_allclose(got, expected[: len(batch)], atol=atol)
            assert got.argmax(1).tolist() == expected[: len(batch)].argmax(1).tolist()


@pytest.mark.slow
def test_real_cpu_build_runs_like_torch_by_both_routes_and_is_refused_by_another_torch(tmp_path: Path) -> None:
    model, x = tiny_vit(), images(16)
    plan = aot.make_plan("fp32", "cpu", (3, 32, 32), max_batch=16)
    out, report = aot.build_aot_engine(model, tmp_path / "fp32.zip", x, torch_logits(model, x), plan, 0.999, 1e-3)
    assert report.passed and report.max_abs_diff < 1e-3
    meta = read_meta(out)
    assert meta.extra["route"] == "aoti" and meta.extra["fallback"] == "compile"
    assert meta.extra["compile_cache_bytes"] > 0 and meta.runtime_version == torch.__version__
    _check_engine(model, out, "cpu", 1e-3)
    with pytest.raises(EngineMismatchError, match="torch version"):
        aot.load_aot_engine(out, replace(aot.runtime_meta("cpu"), runtime_version="2.11.0"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_build_passes_its_gate_and_runs_like_torch(cuda_aot_release: tuple) -> None:
    _, engine, report = cuda_aot_release
    meta = read_meta(engine)
    print(json.dumps(meta.extra["routes"], indent=1))  # what each route did on this GPU (-s shows it)
    assert report.passed and meta.device == torch.cuda.get_device_name() and meta.extra["cuda"] == torch.version.cuda
    assert meta.extra["route"] in ("aoti", "compile") and meta.precision == "fp16"
    _check_engine(tiny_vit(num_classes=5), engine, "cuda", 0.5)


def test_auto_on_a_cuda_machine_keeps_the_gpu_engines_that_pass_and_names_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--target auto` with CUDA builds TensorRT (where installed) and torch-aot; one that fails is left out and
    named, an explicit target's failure stops the build (flows.gpu_engines with the builds replaced by fakes)."""
    from vitops.flows import gpu_engines
    from vitops.flows.config import EngineParams, ExportParams

    def trt(inputs, onnx_path, x, e, precision):
        raise ParityError("parity gate failed: tensorrt-fp16: top-1 agreement 90.00%")

    def aot(inputs, onnx_path, x, e, precision):
        return "torch-aot-fp16", tmp_path / "torch-aot" / "fp16.zip", {"passed": True}

    monkeypatch.setattr(gpu_engines, "build_tensorrt", trt)
    monkeypatch.setattr(gpu_engines, "build_torch_aot", aot)
    inputs = gpu_engines.GateImages(None, images(2), images(2), None)
    args = (inputs, tmp_path / "model.onnx", ExportParams(), EngineParams(out_dir=tmp_path))
    built, skipped = gpu_engines.build_gpu("gpu", *args, trt_available=True)
    assert [b for b, _, _ in built] == ["torch-aot-fp16"] and "agreement 90.00%" in skipped["tensorrt-fp16"]
    built, skipped = gpu_engines.build_gpu("gpu", *args, trt_available=False)  # no tensorrt: not tried
    assert [b for b, _, _ in built] == ["torch-aot-fp16"] and skipped == {}
    with pytest.raises(ParityError, match="tensorrt-fp16"):
        gpu_engines.build_gpu("tensorrt", *args, trt_available=True)
    monkeypatch.setattr(gpu_engines, "build_torch_aot", trt)
    with pytest.raises(ParityError, match="no GPU engine passed its gate: tensorrt-fp16: .*; torch-aot: "):
        gpu_engines.build_gpu("gpu", *args, trt_available=True)
