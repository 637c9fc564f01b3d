"""ONNX export (both exporters), the parity gate, and the ONNX Runtime FP32/INT8 engines on a tiny ViT."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.engines import images, tiny_vit

from vitops.deploy.engine_meta import read_meta
from vitops.deploy.export import export_checked, export_onnx
from vitops.deploy.onnxrt import QuantSettings, build_ort_engine, create_session, select_excluded_nodes, session_logits
from vitops.deploy.parity import ParityError, compare_logits, torch_logits


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def dynamo_onnx(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = export_onnx(model, torch.from_numpy(images(2)), tmp_path_factory.mktemp("onnx") / "model.onnx")
    assert result.exporter == "dynamo"
    return result.path


def _check_dynamic_batch(model: torch.nn.Module, path: Path) -> None:
    session = create_session(path, threads=1)
    assert session.get_inputs()[0].shape[0] not in (1, 2)  # symbolic batch axis
    for batch in (1, 7):
        x = images(batch, seed=batch)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, torch_logits(model, x), atol=1e-4)


def test_dynamo_export_runs_in_onnxruntime_at_any_batch(model: torch.nn.Module, dynamo_onnx: Path) -> None:
    graph = onnx.load(str(dynamo_onnx))
    assert any(op.domain in ("", "ai.onnx") and op.version == 18 for op in graph.opset_import)
    assert "LayerNormalization" in {n.op_type for n in graph.graph.node}  # one op, not a decomposition
    _check_dynamic_batch(model, dynamo_onnx)


def test_torchscript_export_runs_in_onnxruntime_at_any_batch(model: torch.nn.Module, tmp_path: Path) -> None:
    result = export_onnx(model, torch.from_numpy(images(1)), tmp_path / "ts.onnx", exporter="torchscript")
    assert result.exporter == "torchscript"
    _check_dynamic_batch(model, result.path)


def test_auto_export_falls_back_to_torchscript_and_says_so(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr("vitops.deploy.export._export_dynamo", broken)
    with caplog.at_level(logging.WARNING):
        result = export_onnx(model, torch.from_numpy(images(2)), tmp_path / "m.onnx")
    assert result.exporter == "torchscript"
    assert "data-dependent control flow" in result.fallback_reason
    assert "falling back to the TorchScript exporter" in caplog.text
    _check_dynamic_batch(model, result.path)


def test_export_checked_records_exporter_and_parity(model: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "engines" / "model.onnx"
    result, report = export_checked(model, torch.from_numpy(images(16)), out, exporter="torchscript")
    assert report.passed and report.top1_agreement == 1.0 and report.max_abs_diff < 1e-4
    meta = read_meta(out)
    assert meta.extra["exporter"] == "torchscript" and meta.extra["parity"]["passed"]


def test_failed_parity_gate_keeps_the_old_file_and_leaves_nothing_else(model: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous good export")
    with pytest.raises(ParityError, match="parity gate failed.*max \\|logit diff\\|"):
        export_checked(model, torch.from_numpy(images(8)), out, exporter="torchscript", max_abs_diff=1e-12)
    assert out.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_compare_logits_rejects_nan_and_shape_mismatch() -> None:
    ref = np.eye(3, dtype=np.float32)
    with pytest.raises(ParityError, match="NaN"):
        compare_logits(ref, np.full_like(ref, np.nan), "x", 0.9)
    with pytest.raises(ParityError, match="shape"):
        compare_logits(ref, ref[:2], "x", 0.9)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_engine_passes_parity_and_is_published_with_metadata(
    model: torch.nn.Module, dynamo_onnx: Path, tmp_path: Path, mode: str
) -> None:
    x = images(64)
    out = tmp_path / "ort_int8.onnx"
    path, report = build_ort_engine(
        dynamo_onnx, out, x, torch_logits(model, x), "int8", QuantSettings(mode=mode), min_top1_agreement=0.95
    )
    assert report.passed and report.top1_agreement >= 0.95
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("QuantizeLinear" in ops) if mode == "static" else ("DynamicQuantizeLinear" in ops or "MatMulInteger" in ops)
    meta = read_meta(path)
    assert meta.target == "onnxruntime" and meta.precision == f"int8-{mode}"
    assert meta.extra["parity"]["top1_agreement"] == report.top1_agreement
    assert session_logits(create_session(path, 1), x[:3]).shape == (3, 5)


def test_fp32_engine_is_graph_optimised(model: torch.nn.Module, dynamo_onnx: Path, tmp_path: Path) -> None:
    x = images(16)
    path, report = build_ort_engine(dynamo_onnx, tmp_path / "fp32.onnx", x, torch_logits(model, x), max_abs_diff=1e-4)
    assert report.max_abs_diff < 1e-4
    fused = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert fused & {"SkipLayerNormalization", "FusedMatMul", "BiasGelu", "Gelu"}  # ORT's extended fusions


def test_int8_engine_failing_agreement_is_not_written(
    model: torch.nn.Module, dynamo_onnx: Path, tmp_path: Path
) -> None:
    x = images(32)
    wrong_reference = np.roll(torch_logits(model, x), 1, axis=1)  # as if PyTorch said another class
    with pytest.raises(ParityError, match="onnxruntime-int8-dynamic: top-1 agreement"):
        build_ort_engine(dynamo_onnx, tmp_path / "int8.onnx", x, wrong_reference, "int8", QuantSettings(mode="dynamic"))
    assert list(tmp_path.iterdir()) == []


def test_static_quantization_needs_calibration_images(dynamo_onnx: Path, tmp_path: Path) -> None:
    from vitops.deploy.onnxrt import quantize_onnx

    with pytest.raises(ValueError, match="calibration images"):
        quantize_onnx(dynamo_onnx, tmp_path / "q.onnx", QuantSettings(mode="static"), None)


def test_excluded_nodes_are_found_by_structure(dynamo_onnx: Path) -> None:
    graph = onnx.load(str(dynamo_onnx))
    by_name = {n.name: n for n in graph.graph.node}
    scores = select_excluded_nodes(graph, QuantSettings())
    assert len(scores) == 4  # 2 blocks x (Q·Kᵀ, A·V)
    settings = QuantSettings(weights_only=False, exclude=("head", "patch_embed"))
    head_and_embed = select_excluded_nodes(graph, settings)
    assert len(head_and_embed) == 2
    assert by_name[head_and_embed[0]].op_type == "Conv"
    assert by_name[head_and_embed[1]].op_type in ("MatMul", "Gemm")


def test_thread_tuning_picks_the_fastest_count_and_a_fixed_count_skips_it(
    model: torch.nn.Module, dynamo_onnx: Path, tmp_path: Path
) -> None:
    import time

    from vitops.deploy.onnxrt import engine_threads
    from vitops.deploy.timing import thread_candidates, tune_threads

    assert thread_candidates(1) == [1] and thread_candidates(2) == [1, 2] and thread_candidates(6) == [1, 2, 4, 6]
    delays = {1: 0.004, 2: 0.001, 4: 0.002}  # more threads are not always faster
    best, p50 = tune_threads(lambda n: lambda _: time.sleep(delays[n]), images(1), [1, 2, 4], iters=3, rounds=2)
    assert best == 2 and p50[1] > p50[4] > p50[2] >= 1.0

    x = images(16)
    fixed, _ = build_ort_engine(dynamo_onnx, tmp_path / "fixed.onnx", x, torch_logits(model, x), "fp32", threads=1)
    assert read_meta(fixed).extra["threads"] == 1 and read_meta(fixed).extra["thread_p50_ms"] is None
    assert engine_threads(fixed) == 1 and engine_threads(tmp_path / "no-such-engine.onnx") == 0
