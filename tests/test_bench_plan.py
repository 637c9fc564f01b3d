"""`vitops bench --device`: like with like, torch CUDA against TensorRT and torch-aot, torch CPU against ONNX Runtime
(and a torch-aot engine built for the CPU)."""

from __future__ import annotations

import pytest

from vitops.deploy.latency import plan_bench

ALL = {"onnxruntime-fp32", "onnxruntime-int8", "tensorrt-fp16", "tensorrt-int8"}


def test_gpu_machine_benches_both_sides_each_against_its_own_torch() -> None:
    cuda, cpu = plan_bench("auto", cuda_available=True, built=ALL)
    assert (cuda.device, cuda.reference) == ("cuda", "torch-cuda")
    assert cuda.backends == ["torch-cuda", "torch-cuda-compile", "tensorrt-fp16", "tensorrt-int8"]
    assert (cpu.device, cpu.reference) == ("cpu", "torch-eager")
    assert cpu.backends == ["torch-eager", "onnxruntime-fp32", "onnxruntime-int8"]


def test_device_picks_one_side_and_unbuilt_engines_are_left_out() -> None:
    (cpu,) = plan_bench("cpu", cuda_available=True, built={"onnxruntime-int8", "tensorrt-fp16"})
    assert cpu.backends == ["torch-eager", "onnxruntime-int8"]
    (cuda,) = plan_bench("cuda", cuda_available=True, built={"onnxruntime-int8", "tensorrt-fp16"})
    assert cuda.backends == ["torch-cuda", "torch-cuda-compile", "tensorrt-fp16"]


def test_cpu_machine_has_no_cuda_side() -> None:
    (cpu,) = plan_bench("auto", cuda_available=False, built=ALL)
    assert cpu.device == "cpu" and "tensorrt-fp16" not in cpu.backends
    with pytest.raises(ValueError, match="no CUDA device here; use --device cpu"):
        plan_bench("cuda", cuda_available=False, built=ALL)


def test_torch_aot_engines_are_timed_against_torch_on_the_device_they_were_built_for() -> None:
    built = {"onnxruntime-fp32", "torch-aot-fp16", "torch-aot-fp32"}
    cuda, cpu = plan_bench("auto", True, built, {"torch-aot-fp16": "cuda", "torch-aot-fp32": "cpu"})
    assert cuda.backends == ["torch-cuda", "torch-cuda-compile", "torch-aot-fp16"]
    assert cpu.backends == ["torch-eager", "onnxruntime-fp32", "torch-aot-fp32"]
    (cpu,) = plan_bench("auto", False, {"torch-aot-fp32"}, {"torch-aot-fp32": "cpu"})
    assert cpu.backends == ["torch-eager", "torch-aot-fp32"]
    (cpu,) = plan_bench("auto", False, {"torch-aot-fp16"}, {"torch-aot-fp16": "cuda"})
    assert cpu.backends == ["torch-eager"]  # a CUDA engine on a machine without CUDA: not timed
