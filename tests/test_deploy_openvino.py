"""OpenVINO CPU engines on a tiny ViT: FP32 and NNCF INT8 builds behind the parity gate, the BF16 decision,
refusal of engines built elsewhere, the telemetry switch, and the choice of the engine to serve with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.engines import images, tiny_vit

from vitops.deploy.engine_meta import EngineMismatchError, read_meta
from vitops.deploy.export import export_onnx
from vitops.deploy.openvino import (
    OpenVINOUnavailable,
    build_ov_engine,
    compile_config,
    cpu_isa,
    load_ov_engine,
    make_plan,
    precision_support,
    runtime_meta,
)
from vitops.deploy.parity import ParityError, torch_logits
from vitops.deploy.selection import Candidate, NoEngineError, choose_engine, read_selection, write_selection

SAPPHIRE_RAPIDS = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def onnx_path(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, torch.from_numpy(images(2)), tmp_path_factory.mktemp("onnx") / "model.onnx").path


@pytest.fixture(scope="module")
def fp32_engine(model: torch.nn.Module, onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = images(32)
    support = precision_support(["FP32", "INT8"], [])
    path, report = build_ov_engine(
        onnx_path, tmp_path_factory.mktemp("ov") / "fp32.zip", x, torch_logits(model, x), make_plan("fp32", support),
        max_abs_diff=1e-3, min_top1_agreement=0.999,
    )  # fmt: skip
    assert report.passed
    return path


def test_fp32_engine_runs_like_torch_and_records_what_it_was_built_for(
    model: torch.nn.Module, onnx_path: Path, fp32_engine: Path
) -> None:
    import openvino

    meta = read_meta(fp32_engine)
    assert (meta.target, meta.precision) == ("openvino", "fp32")
    assert meta.runtime_version == openvino.get_version() and meta.device == runtime_meta().device
    assert meta.extra["isa"] == runtime_meta().extra["isa"]
    assert meta.extra["inference_precision_hint"] == "f32" and "f32" in meta.extra["inference_precision"]
    assert meta.extra["streams"] == 1
    tuned = {int(n): ms for n, ms in meta.extra["thread_p50_ms"].items()}
    assert meta.extra["threads"] == min(tuned, key=tuned.__getitem__)  # serving threads tuned at build
    assert meta.extra["parity"]["passed"] and meta.extra["parity"]["max_abs_diff"] < 1e-3
    from vitops.common.files import sha256_file

    assert meta.onnx_sha256 == sha256_file(onnx_path)
    with zipfile.ZipFile(fp32_engine) as zf:  # one file: the IR, weights kept in FP32
        assert sorted(zf.namelist()) == ["model.bin", "model.xml"]
        assert b'element_type="f16"' not in zf.read("model.xml")
    run = load_ov_engine(fp32_engine)
    for batch in (1, 5):  # dynamic batch
        x = images(batch, seed=10 + batch)
        np.testing.assert_allclose(run(x), torch_logits(model, x), atol=1e-4)


def test_int8_engine_is_quantized_by_nncf_and_passes_agreement(
    model: torch.nn.Module, onnx_path: Path, tmp_path: Path
) -> None:
    x = images(64)
    plan = make_plan("int8", precision_support(["FP32", "INT8"], []))
    path, report = build_ov_engine(
        onnx_path, tmp_path / "int8.zip", x, torch_logits(model, x), plan, threads=1, min_top1_agreement=0.9
    )
    assert report.top1_agreement >= 0.9
    with zipfile.ZipFile(path) as zf:
        assert b"FakeQuantize" in zf.read("model.xml")  # NNCF's quantizers, run as INT8 by the CPU plugin
    meta = read_meta(path)
    assert meta.precision == "int8" and meta.extra["quantization"]["tool"] == "nncf"
    assert meta.extra["threads"] == 1 and meta.extra["thread_p50_ms"] is None  # a fixed count skips tuning
    assert load_ov_engine(path)(x[:3]).shape == (3, 5)


def test_failing_gate_keeps_the_earlier_engine_and_writes_nothing_else(
    model: torch.nn.Module, onnx_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fp32.zip"
    out.write_bytes(b"the earlier engine")
    x = images(16)
    with pytest.raises(ParityError, match=r"openvino-fp32: .*max \|logit diff\|.*\(limit 0\)"):
        build_ov_engine(
            onnx_path, out, x, torch_logits(model, x), make_plan("fp32", {"fp32": ""}), threads=1, max_abs_diff=0.0
        )
    assert out.read_bytes() == b"the earlier engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.zip"]


def test_bf16_is_refused_without_native_bf16_and_always_set_explicitly() -> None:
    amd = precision_support(["FP32", "INT8", "BIN", "EXPORT_IMPORT"], cpu_isa(["avx2", "fma"]))
    assert amd["fp32"] == amd["int8"] == "" and "no native BF16" in amd["bf16"] and "AVX2" in amd["bf16"]
    with pytest.raises(OpenVINOUnavailable, match="OpenVINO BF16 cannot run here: this CPU has no native BF16"):
        make_plan("bf16", amd)
    spr = precision_support(["FP32", "BF16", "INT8"], cpu_isa(SAPPHIRE_RAPIDS))
    assert make_plan("bf16", spr).hint == "bf16"
    # FP32 and INT8 say f32 explicitly: left unset, the CPU plugin would pick BF16 by itself on AMX CPUs
    assert make_plan("fp32", spr).hint == make_plan("int8", spr).hint == "f32"
    assert compile_config("f32", 0) == {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    assert compile_config("bf16", 2)["INFERENCE_NUM_THREADS"] == 2
    assert cpu_isa(SAPPHIRE_RAPIDS) == ["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AMX-BF16", "AMX-INT8"]


def test_engine_built_for_another_openvino_or_cpu_is_refused(fp32_engine: Path) -> None:
    here = runtime_meta()
    for other, what in (
        (replace(here, runtime_version="2024.0.0-0000"), "OpenVINO version"),
        (replace(here, extra={**here.extra, "isa": cpu_isa(SAPPHIRE_RAPIDS)}), "ISA"),
        (replace(here, device="Intel(R) Xeon(R) Platinum 8480+"), "CPU"),
    ):
        if other == here:  # this machine is a Sapphire Rapids: nothing differs for that field
            continue
        with pytest.raises(EngineMismatchError, match=f"OpenVINO engine does not match this machine: {what}"):
            load_ov_engine(fp32_engine, runtime=other)


def test_with_do_not_track_openvino_records_and_sends_nothing(onnx_path: Path, tmp_path: Path, repo_root: Path) -> None:
    code = (
        "import sys; from deploy.openvino import _convert, ov_status; ov_status(); _convert(sys.argv[1]);"
        "import nncf; print(sys.modules['openvino_telemetry'])"
    )
    env = {**os.environ, "HOME": str(tmp_path), "DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(onnx_path)], env=env, cwd=repo_root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "None"  # hidden: OpenVINO's converter and NNCF use their no-op stubs
    assert not (tmp_path / "intel").exists()  # where OpenVINO's telemetry keeps its client id


def _candidates() -> list[Candidate]:
    return [
        Candidate("onnxruntime-fp32", "onnxruntime/fp32.onnx", 10.0, 1.0),
        Candidate("onnxruntime-int8", "onnxruntime/int8.onnx", 5.0, 0.99),
        Candidate("openvino-fp32", "openvino/fp32.zip", 7.0, 1.0),
        Candidate("openvino-bf16", "openvino/bf16.zip", 4.0, 0.995),
        Candidate("openvino-int8", "openvino/int8.zip", 3.0, 0.97),
    ]


def test_auto_serves_the_fastest_engine_that_agrees_enough(tmp_path: Path) -> None:
    skipped = {"tensorrt-fp16": "no CUDA device"}
    selection = choose_engine(_candidates(), 0.99, skipped)
    assert (selection.chosen, selection.file) == ("openvino-bf16", "openvino/bf16.zip")  # INT8 is faster, agrees less
    assert "lowest batch-1 p50 (4 ms; next onnxruntime-int8 5 ms)" in selection.reason
    assert ">= 99.00%" in selection.reason and selection.skipped == skipped
    rows = {r["backend"]: r for r in selection.candidates}
    assert rows["openvino-int8"]["passed_over"] == "top-1 agreement 97.00% < 99.00%"
    assert rows["openvino-bf16"]["chosen"] and "chosen" not in rows["openvino-fp32"]
    assert choose_engine(_candidates(), 0.95).chosen == "openvino-int8"  # a lower floor lets INT8 serve
    assert choose_engine(_candidates()[:1], 0.99).reason.endswith(", the only candidate) among the 1 engine(s) "
                                                                  "with top-1 agreement >= 99.00%")  # fmt: skip

    write_selection(tmp_path, selection, onnx_sha256="abc")
    assert read_selection(tmp_path, "abc")["chosen"] == "openvino-bf16"
    assert read_selection(tmp_path, "another export") is None  # engines of an older model are not served


def test_no_engine_agreeing_enough_is_a_gate_failure() -> None:
    with pytest.raises(NoEngineError, match="no engine to serve with: .*openvino-int8: top-1 agreement 97.00%"):
        choose_engine(_candidates(), 1.01)
    assert issubclass(NoEngineError, ParityError)  # exit 1, like any gate that says no
    with pytest.raises(NoEngineError, match="openvino-bf16: this CPU has no native BF16"):
        choose_engine([], 0.99, {"openvino-bf16": "this CPU has no native BF16"})


def test_selection_file_is_json_with_every_candidate(tmp_path: Path) -> None:
    path = write_selection(tmp_path, choose_engine(_candidates(), 0.99), onnx_sha256="abc")
    doc = json.loads(path.read_text())
    assert [c["backend"] for c in doc["candidates"]] == [c.backend for c in _candidates()]
    assert doc["min_top1_agreement"] == 0.99 and doc["created"]
