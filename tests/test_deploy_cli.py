"""`vitops export`, `vitops build` and `vitops bench` end to end on a tiny model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vitops.flows.cli import main
from vitops.vit.bundle import ModelMeta, save_bundle

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm

    meta = ModelMeta(
        model="vit_tiny_patch16_224",
        classes=[f"c{i}" for i in range(5)],
        img_size=32,
        model_kwargs={"patch_size": 8, "depth": 2},
    )
    torch.manual_seed(0)
    model = timm.create_model(meta.model, pretrained=False, **meta.create_kwargs())
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # margins like a trained model's
    return save_bundle(model, meta, tmp_path_factory.mktemp("bundle") / "model")


@pytest.fixture()
def params_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((48, 3, 32, 32), dtype=np.float32))
    monkeypatch.setattr("vitops.flows.engines.validation_images", lambda dataset, meta, limit: images[:limit])
    raw = {
        "validate": {"manifest": str(tmp_path / "manifest.csv"), "report": str(tmp_path / "report.json")},
        "export": {"out": str(tmp_path / "engines" / "model.onnx"), "parity_images": 32},
        "engine": {
            "out_dir": str(tmp_path / "engines"),
            "calibration_images": 16,
            "min_int8_top1_agreement": 0.9,
            "trt_timing_cache": str(tmp_path / "trt.cache"),
        },
        "bench": {"warmup": 1, "iters": 5, "large_batch": 4, "out": str(tmp_path / "bench" / "latency.json")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_build_then_bench_writes_engines_json_and_table(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engines = params_file.parent / "engines"
    assert main(["--params", str(params_file), "build", str(model_dir)]) == 0
    out = capsys.readouterr().out
    if NO_CUDA:
        assert "TensorRT skipped (no CUDA device); building the CPU engines (ONNX Runtime, OpenVINO) instead" in out
    names = ["model.onnx", "onnxruntime/fp32.onnx", "onnxruntime/int8.onnx", "openvino/fp32.zip", "openvino/int8.zip"]
    for name in names:
        assert (engines / name).is_file() and (engines / f"{name}.json").is_file()
    # every CPU engine this machine runs was timed; the fastest that agrees enough serves, and the file says why
    selection = json.loads((engines / "selection.json").read_text())
    assert {c["backend"] for c in selection["candidates"]} >= {"onnxruntime-fp32", "openvino-fp32", "openvino-int8"}
    assert f"serving with {selection['chosen']}: lowest batch-1 p50" in out
    if "BF16" not in _capabilities():
        assert "openvino-bf16 not built: this CPU has no native BF16" in out
        assert not (engines / "openvino/bf16.zip").exists()
    int8_meta = json.loads((engines / "onnxruntime/int8.onnx.json").read_text())
    assert int8_meta["precision"] == "int8-dynamic"
    # serving threads were tuned at build: the fastest measured count is the one recorded
    tuned = {int(n): ms for n, ms in int8_meta["extra"]["thread_p50_ms"].items()}
    assert 1 in tuned and int8_meta["extra"]["threads"] == min(tuned, key=tuned.__getitem__)

    assert main(["--params", str(params_file), "build", str(model_dir), "--target", "onnxruntime"]) == 0
    assert "(exported from this model)" in capsys.readouterr().out  # no second export
    # the rebuild tuned its threads again (on a busy 2-core machine 1 or 2 may win): bench uses the new count
    int8_meta = json.loads((engines / "onnxruntime/int8.onnx.json").read_text())

    assert main(["--params", str(params_file), "bench", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "x torch-eager p50" in out and "onnxruntime-int8" in out
    report = json.loads((params_file.parent / "bench" / "latency.json").read_text())
    assert report["metrics"]["latency_p50_ms.onnxruntime-int8"] > 0
    backends = {r["backend"]: r for r in report["results"]}
    assert {"torch-eager", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-int8"} <= set(backends)
    # the rebuild above chose among the ONNX Runtime engines it built: that is the bench's target engine
    rechosen = json.loads((engines / "selection.json").read_text())["chosen"]
    assert rechosen.startswith("onnxruntime") and report["target_engine"] == rechosen
    assert f"target engine (serves this version): {rechosen}" in out
    for r in backends.values():
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["throughput_ips"] > 0 and r["large_batch"] == 4
    assert backends["onnxruntime-int8"]["threads"] == int8_meta["extra"]["threads"]  # benched as built
    assert backends["torch-eager"]["threads"] >= 1 and "torch eager batch-1 p50 by threads" in out
    # compute efficiency beside the latency: the model's FLOPs over each backend's batch-1 p50
    gflop = report["model"]["gflop_per_image"]
    assert gflop > 0 and "GFLOP/s" in out
    for name, r in backends.items():
        assert r["gflops"] == pytest.approx(gflop / (r["p50_ms"] / 1e3))
        assert report["metrics"][f"gflops.{name}"] == r["gflops"]
    table = (params_file.parent / "bench" / "latency.txt").read_text().splitlines()
    assert table[0].startswith("latency of vit_tiny") and table[1].startswith("cpu: ")
    assert table[2].startswith("backend")
    assert all(len(r["samples_ms"]) == 5 for r in backends.values())  # every timed call, for the KPI report


def _capabilities() -> list[str]:
    from vitops.deploy.openvino import ov_status

    return ov_status()[1]


@pytest.fixture()
def no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU as OpenVINO would see it without native BF16 (whatever the machine has)."""

    from vitops.deploy import openvino

    real = openvino.ov_status
    monkeypatch.setattr(openvino, "ov_status", lambda: (real()[0], ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]))


@pytest.mark.usefixtures("no_bf16")
def test_auto_without_bf16_skips_it_and_bench_and_kpi_use_the_chosen_engine(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitops.common.files import sha256_file
    from vitops.flows.gate import target_latency

    def fake_turns(runners: dict, image: np.ndarray, blocks: list[int]) -> dict[str, list[float]]:
        # as if OpenVINO FP32 were the fastest at build: 1 ms against 5 ms for every other engine
        return {name: [0.001 if name == "openvino-fp32" else 0.005] * sum(blocks) for name in runners}

    from vitops.deploy import timing

    monkeypatch.setattr(timing, "time_in_turns", fake_turns)
    assert main(["--params", str(params_file), "build", str(model_dir), "--target", "auto"]) == 0
    out = capsys.readouterr().out
    assert "openvino-bf16 not built: this CPU has no native BF16" in out
    assert "serving with openvino-fp32: lowest batch-1 p50 (1 ms; next onnxruntime-fp32 5 ms)" in out
    engines = params_file.parent / "engines"
    assert json.loads((engines / "selection.json").read_text())["skipped"]["openvino-bf16"].startswith("this CPU")

    assert main(["--params", str(params_file), "bench", str(model_dir), "--iters", "5"]) == 0
    bench = params_file.parent / "bench" / "latency.json"
    report = json.loads(bench.read_text())
    assert report["target_engine"] == "openvino-fp32" and "lowest batch-1 p50" in report["target_reason"]
    # the latency KPI is the served engine's, even where the bench timed another engine faster
    latency = target_latency(bench, sha256_file(model_dir / "weights.safetensors"))
    row = next(r for r in report["results"] if r["backend"] == "openvino-fp32")
    assert latency.engine == "openvino-fp32" and latency.p95_ms == row["p95_ms"]


@pytest.mark.usefixtures("no_bf16")
def test_explicit_openvino_bf16_without_native_bf16_is_a_usage_error(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--params", str(params_file), "build", str(model_dir), "--target", "openvino", "--precision", "bf16"]
    assert main(args) == 2
    assert "OpenVINO BF16 cannot run here: this CPU has no native BF16" in capsys.readouterr().err
    assert not (params_file.parent / "engines" / "openvino").exists()


def test_failing_gates_stop_an_explicit_build_and_are_left_out_by_auto(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--params", str(params_file), "export", str(model_dir)]) == 0
    raw = yaml.safe_load(params_file.read_text())
    raw["export"]["max_abs_diff"] = 1e-12  # no FP32 engine can pass that (the export is reused as it is)
    raw["engine"]["ov_precision"] = "fp32"
    params_file.write_text(yaml.safe_dump(raw))
    engines = params_file.parent / "engines"
    assert main(["--params", str(params_file), "build", str(model_dir), "--target", "openvino"]) == 1
    assert "parity gate failed: openvino-fp32" in capsys.readouterr().err
    assert list((engines / "openvino").iterdir()) == []  # no engine, no metadata, no temporary folder

    raw["engine"]["ov_precision"] = "auto"
    params_file.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(params_file), "build", str(model_dir)]) == 0  # auto: the INT8 engines pass
    out = capsys.readouterr().out
    assert "onnxruntime-fp32 not built: parity gate failed" in out and "openvino-fp32 not built: parity gate" in out
    assert not (engines / "onnxruntime/fp32.onnx").exists() and not (engines / "openvino/fp32.zip").exists()
    chosen = json.loads((engines / "selection.json").read_text())["chosen"]
    assert chosen in ("onnxruntime-int8", "openvino-int8") and (engines / "openvino/int8.zip").is_file()


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on machines without CUDA")
def test_explicit_tensorrt_without_cuda_is_a_clear_error(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--params", str(params_file), "build", str(model_dir), "--target", "tensorrt"]) == 2
    assert "TensorRT was requested but cannot run here: no CUDA device" in capsys.readouterr().err
    assert not (params_file.parent / "engines").exists()


def test_torch_aot_takes_only_its_own_precisions(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--params", str(params_file), "build", str(model_dir), "--target", "torch-aot", "--precision", "int8"]
    assert main(args) == 2
    assert "--precision int8 is not a torch-aot precision: use fp16, bf16, fp32" in capsys.readouterr().err
    assert not (params_file.parent / "engines" / "torch-aot").exists()


@pytest.mark.slow
def test_torch_aot_build_is_served_benched_and_registered_like_the_others(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On this CPU, `--target torch-aot` builds the AOTInductor package for the CPU (~30 s): gated, chosen, and timed
    against torch on the CPU by `vitops bench` (a CUDA engine is timed against torch on CUDA)."""
    from vitops.deploy.engine_meta import read_meta

    args = ["--params", str(params_file), "build", str(model_dir), "--target", "torch-aot", "--precision", "fp32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    engines = params_file.parent / "engines"
    meta = read_meta(engines / "torch-aot" / "fp32.zip")
    assert (meta.target, meta.precision, meta.extra["device_type"], meta.extra["route"]) == (
        "torch-aot", "fp32", "cpu", "aoti",
    )  # fmt: skip
    assert "parity: torch-aot-fp32 (aoti): top-1 agreement 100.00%" in out
    assert "serving with torch-aot-fp32: lowest batch-1 p50" in out
    assert main(["--params", str(params_file), "bench", str(model_dir), "--device", "cpu", "--iters", "5"]) == 0
    report = json.loads((params_file.parent / "bench" / "latency.json").read_text())
    assert report["groups"][0]["backends"] == ["torch-eager", "torch-aot-fp32"]
    assert report["target_engine"] == "torch-aot-fp32"
    assert {r["backend"] for r in report["results"]} == {"torch-eager", "torch-aot-fp32"}


def test_export_failing_parity_is_a_clear_error_and_writes_nothing(
    model_dir: Path, params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load(params_file.read_text())
    raw["export"]["max_abs_diff"] = 1e-12
    params_file.write_text(yaml.safe_dump(raw))
    # a parity gate that says no is a gate failure (exit 1), not a usage error
    assert main(["--params", str(params_file), "export", str(model_dir), "--exporter", "torchscript"]) == 1
    assert "parity gate failed: onnx (torchscript)" in capsys.readouterr().err
    assert not (params_file.parent / "engines" / "model.onnx").exists()


def test_missing_validation_data_names_the_manifest(tmp_path: Path) -> None:
    from vitops.flows.config import parse_params
    from vitops.flows.engines import EngineInputError, validation_images
    from vitops.flows.settings import dataset_of

    params = parse_params({"validate": {"manifest": str(tmp_path / "none.csv")}})
    with pytest.raises(EngineInputError, match="none.csv: no manifest; run `vitops validate` first"):
        validation_images(dataset_of(params), None, 8)


@pytest.mark.integration
def test_bench_without_engines_says_what_to_build_and_logs_to_mlflow(
    model_dir: Path, params_file: Path, tracking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    assert main(["--params", str(params_file), "bench", str(model_dir), "--iters", "3", "--track"]) == 0
    out = capsys.readouterr().out
    assert "skipped onnxruntime-fp32" in out and "build it with `vitops build`" in out
    run_id = out.split("logged to MLflow run ")[1].split()[0]
    client = MlflowClient(tracking)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["latency_p50_ms.torch-eager"] > 0
    assert {a.path for a in client.list_artifacts(run_id, "bench")} == {"bench/latency.json", "bench/latency.txt"}
