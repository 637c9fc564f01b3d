"""How close a backend runs to the machine: model FLOPs against the measured FP32 matrix-multiply peak.

A latency ratio alone cannot tell a slow engine from a fast machine limit. `model_flops` counts the
forward FLOPs of one image with torch's FLOP counter; `gemm_peak_gflops` measures what the CPU (or GPU)
delivers on a large square FP32 matrix product through the same library a backend uses (torch, or ONNX
Runtime's MLAS). `achieved_gflops / peak` is then the share of the hardware a backend's batch-1 latency
implies. The GEMMs of a network can run near peak, but its small matrices, LayerNorm, softmax, GELU and
layout glue keep the whole well below it; a latency target that needs a share close to the GEMM peak
asks for a lower precision or other hardware, not for a better runtime setting.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def _explicit_attention(model: Any) -> Iterator[None]:
    """Switch timm's fused attention to its explicit matmuls: the fused CPU kernel has no FLOP formula."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True


def model_flops(model: Any, example: Any, backward: bool = False) -> float:
    """FLOPs (a multiply-add counts 2) of `model` on `example`, divided by its batch size.

    Args:
        model: the network; its train/eval mode is restored afterwards (and, with `backward`, its gradients
            cleared).
        example: an input batch; it is moved to the model's device (a benchmark may have moved the model).
        backward: count a training step's forward and backward pass (in train mode) instead of inference.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    example = example.to(next((p.device for p in model.parameters()), example.device))
    was_training = model.training
    model.train(backward)
    try:
        with _explicit_attention(model), FlopCounterMode(display=False) as counter:
            if backward:
                model(example).float().sum().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / example.shape[0]


def _matmul_onnx(path: Path, n: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm_peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def gemm_peak_gflops(backend: str = "torch", threads: int = 0, n: int = 2048, repeats: int = 5) -> float:
    """Best FP32 GFLOP/s of an n x n x n matrix product on `backend` (`torch`, `onnxruntime` or `cuda`).

    Args:
        backend: `torch` (CPU, oneDNN/MKL), `onnxruntime` (CPU, MLAS) or `cuda` (torch on the GPU, TF32 off).
        threads: CPU threads (0 = the library's default).
        n: matrix side; 2048 is large enough to reach peak on CPUs, use 8192 on GPUs.
        repeats: timed products; the fastest counts.
    """
    from vitops.deploy.timing import time_in_turns

    flops = 2.0 * n**3
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    if backend == "onnxruntime":
        from vitops.deploy.onnxrt import create_session

        with tempfile.TemporaryDirectory(prefix="vitops-peak-") as tmp:
            path = Path(tmp) / "matmul.onnx"
            _matmul_onnx(path, n)
            session = create_session(path, threads)
            times = time_in_turns({backend: lambda x: session.run(None, {"x": x})}, a, [repeats])[backend]
    elif backend in ("torch", "cuda"):
        import torch

        device = "cuda" if backend == "cuda" else "cpu"
        before = torch.get_num_threads()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            x = torch.from_numpy(a).to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            times = time_in_turns({backend: lambda _: (torch.mm(x, x), sync())}, a, [repeats])[backend]
        finally:
            torch.set_num_threads(before)
            torch.backends.cuda.matmul.allow_tf32 = tf32
    else:
        raise ValueError(f"unknown backend {backend!r}: use torch, onnxruntime or cuda")
    return flops / min(times) / 1e9


def achieved_gflops(flops_per_image: float, batch: int, seconds: float) -> float:
    """GFLOP/s that a batch of `batch` images in `seconds` implies."""
    return flops_per_image * batch / seconds / 1e9
