"""Layer norm of one row inside a Triton kernel: shared by the phi-2 (phi_decode.py) and Marian
(kernels/marian.py) fast paths, whose kernels each add a residual first and then normalise."""

from __future__ import annotations

try:  # absent on CPU-only installs, where neither fast path runs its kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def layer_norm_row(h, valid, cols, N, w_ptr, b_ptr, eps):
        """layer_norm(h) * w + b in fp32, for a row h of N features held as fp32 (0 where not valid)."""
        mean = tl.sum(h, axis=0) / N
        centred = tl.where(valid, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        return centred * rstd * w + b
