"""Which local attention kernel "auto" picks (attention/local.py: pick_backend), and the CUDA flash SDPA
backend's calls checked on meta tensors (the op's shape functions: signatures, GQA, lse layout).

The CUDA kernels themselves cannot run here; benchmarks/gpu_check.py runs them against an fp64 reference.
"""

from __future__ import annotations

import pytest
import torch

from meshweave.attention.local import _choose, block_backward, block_forward, pick_backend

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "dense", "flash_attn", "cuda_flash", "expected"),
    [
        ("cpu", FP32, 64, False, False, False, "cpu_flash"),
        ("cpu", BF16, 64, True, True, True, "cpu_flash"),  # the CPU op takes dense masks; CUDA facts are moot
        ("cpu", FP64, 60, False, False, False, "cpu_flash"),
        ("cuda", BF16, 128, False, True, True, "flash_attn"),  # flash-attn first when it imports
        ("cuda", FP16, 64, False, True, False, "flash_attn"),
        ("cuda", BF16, 128, False, False, True, "cuda_flash"),  # else torch's own flash op
        ("cuda", FP16, 256, False, False, True, "cuda_flash"),
        ("cuda", BF16, 8, False, False, True, "cuda_flash"),
        ("cuda", FP32, 128, False, False, True, "math"),  # flash computes in half only: fp32 keeps precision
        ("cuda", FP64, 128, False, True, True, "math"),
        ("cuda", BF16, 60, False, False, True, "math"),  # head_dim not a multiple of 8
        ("cuda", BF16, 512, False, False, True, "math"),  # head_dim over 256
        ("cuda", BF16, 128, True, True, True, "math"),  # dense mask: neither flash kernel takes one
        ("cuda", BF16, 128, False, False, False, "math"),  # torch built without flash, or a pre-sm80 GPU
        ("mps", BF16, 128, False, False, False, "math"),
    ],
)
def test_pick_backend(device, dtype, head_dim, dense, flash_attn, cuda_flash, expected):
    assert pick_backend(device, dtype, head_dim, dense, flash_attn=flash_attn, cuda_flash=cuda_flash) == expected


def test_choose_on_cpu_tensors_and_unknown_names():
    q = torch.zeros(1, 2, 4, 8)
    assert _choose("auto", q, "causal") == "cpu_flash"
    assert _choose("math", q, "causal") == "math"
    with pytest.raises(ValueError, match="unknown attention backend"):
        _choose("flash3", q, "causal")


@pytest.mark.parametrize("mask", ["full", "causal"])
def test_cuda_flash_calls_have_the_right_shapes_on_meta_tensors(mask):
    b, h, hkv, s, d = 2, 8, 2, 16, 64
    q = torch.empty(b, h, s, d, device="meta", dtype=BF16)
    k, v = (torch.empty(b, hkv, s, d, device="meta", dtype=BF16) for _ in range(2))
    out, lse = block_forward(q, k, v, mask, d**-0.5, "cuda_flash")
    assert (out.shape, out.dtype) == ((b, h, s, d), FP32)
    assert (lse.shape, lse.dtype) == ((b, h, s), FP32)  # the layout the merge keeps: (B, H, S)
    dq, dk, dv = block_backward(q, q, k, v, out, lse, mask, d**-0.5, "cuda_flash")
    assert [t.shape for t in (dq, dk, dv)] == [(b, h, s, d), (b, hkv, s, d), (b, hkv, s, d)]  # GQA summed by the op
    assert {t.dtype for t in (dq, dk, dv)} == {FP32}


def test_cuda_flash_refuses_a_dense_mask_and_a_non_square_causal_block():
    q = torch.empty(1, 2, 4, 8, device="meta", dtype=BF16)
    with pytest.raises(TypeError, match="dense mask"):
        block_forward(q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool), 1.0, "cuda_flash")
    with pytest.raises(ValueError, match="square"):
        block_forward(q, q[:, :, :2], q[:, :, :2], "causal", 1.0, "cuda_flash")
