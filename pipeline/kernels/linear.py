"""Matrix products for a few rows (the decode step at batch 16 or less), and phi-2's GELU in Triton.

`skinny_linear` streams the weight once with the epilogue fused. Measured on an H100 at phi-2's shapes
(docs/benchmarks.md) it reads the qkv and fc1 weights a few percent faster than cuBLAS and saves
fc1's separate GELU kernel; cuBLAS stays faster for dense and fc2 (N = 2560 gives this kernel too
few programs), so those stay on cuBLAS.
"""

from __future__ import annotations

import torch

try:  # absent on CPU-only installs, where the callers take torch's products
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

SKINNY_MAX_ROWS = 16  # the kernel's tile holds 16 rows (the smallest tensor-core tile)
SKINNY_BLOCK_N, SKINNY_BLOCK_K = 16, 128
SKINNY_WARPS, SKINNY_STAGES = 2, 4


def skinny_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_linear serves x @ weight.T (few rows, shapes its tiles divide)."""
    return (x.shape[0] <= SKINNY_MAX_ROWS and weight.shape[0] % SKINNY_BLOCK_N == 0
            and weight.shape[1] % SKINNY_BLOCK_K == 0)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """[gelu_new](x @ weight.T + bias) for x of at most SKINNY_MAX_ROWS rows (see skinny_fits)."""
    rows, inner = x.shape
    out_features = weight.shape[0]
    assert skinny_fits(x, weight)
    y = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    _skinny_linear_kernel[(out_features // SKINNY_BLOCK_N,)](
        x, weight, bias, y, rows, inner, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=SKINNY_BLOCK_N, BLOCK_K=SKINNY_BLOCK_K, GELU=gelu,
        num_warps=SKINNY_WARPS, num_stages=SKINNY_STAGES,
    )
    return y


if triton is not None:

    @triton.jit
    def gelu_new(x):
        """phi-2's activation on fp32 values: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh via exp."""
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))

    @triton.jit
    def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, K, stride_x, stride_w, stride_y,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GELU: tl.constexpr):
        """y = [gelu](x @ w.T + b) for few rows of x: streams w once, epilogue fused."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + m[:, None] * stride_x + k[None, :]
        w_ptrs = w_ptr + n[:, None] * stride_w + k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=m[:, None] < M, other=0.0)
            w = tl.load(w_ptrs)
            acc += tl.dot(x, tl.trans(w))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc += tl.load(b_ptr + n)[None, :].to(tl.float32)
        if GELU:
            acc = gelu_new(acc)
        tl.store(y_ptr + m[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m[:, None] < M)
