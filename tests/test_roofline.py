"""The roofline figures of the latency bench: FLOP counts a user can check by hand, and a measured peak."""

from __future__ import annotations

import pytest
import timm
import torch

from vitops.deploy.roofline import achieved_gflops, gemm_peak_gflops, model_flops


def test_linear_flops_are_two_per_multiply_add_per_image():
    layer = torch.nn.Linear(64, 10)
    assert model_flops(layer, torch.randn(4, 64)) == 2 * 64 * 10


def test_flops_of_a_model_on_another_device_than_the_example():
    # `vitops bench` times torch on the GPU (moving the model there) and counts with a host-side image
    layer = torch.nn.Linear(64, 10, device="meta")
    assert model_flops(layer, torch.randn(2, 64)) == 2 * 64 * 10


def test_training_flops_add_the_backward_pass_and_keep_the_mode():
    layers = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)).eval()
    forward = 2 * (64 * 32 + 32 * 10)
    # backward: weight gradients of both layers, input gradient of the second only (the data needs none)
    backward = 2 * (64 * 32 + 32 * 10) + 2 * 32 * 10
    assert model_flops(layers, torch.randn(4, 64), backward=True) == forward + backward
    assert not layers.training
    assert all(p.grad is None for p in layers.parameters())


def test_vit_flops_include_attention_and_leave_fused_attention_on():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    tokens, dim, heads = 17, 192, 3
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * 4 * dim)  # qkv, proj, mlp fc1 + fc2
    attention = 2 * 2 * heads * tokens * tokens * (dim // heads)  # q @ k^T and attn @ v
    patch_embed = 2 * 16 * (3 * 8 * 8) * dim
    head = 2 * dim * 1000
    expected = 2 * (per_block + attention) + patch_embed + head
    assert model_flops(model, torch.randn(1, 3, 32, 32)) == expected
    assert all(block.attn.fused_attn for block in model.blocks)  # switched back after counting
    assert model.training  # the caller's mode is kept


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_gemm_peak_is_measured_on_cpu_backends(backend):
    assert gemm_peak_gflops(backend, threads=1, n=128, repeats=2) > 0.1


def test_gemm_peak_names_an_unknown_backend():
    with pytest.raises(ValueError, match="openvino"):
        gemm_peak_gflops("openvino", n=8)


def test_achieved_gflops():
    assert achieved_gflops(1e9, 4, 0.5) == pytest.approx(8.0)
