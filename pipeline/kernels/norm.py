"""Layer norm inside Triton kernels: the row helper shared by the phi-2 and Marian (kernels/marian.py) fast paths, whose
kernels each add a residual first and then normalise, and phi-2's add-then-normalise kernel."""

from __future__ import annotations

import torch

from pipeline.kernels.pdl import pdl_options

try:  # absent on CPU-only installs, where neither fast path runs its kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def add_layer_norm(h: torch.Tensor, adds: tuple, weight: torch.Tensor, shift: torch.Tensor, eps: float, *,
                   warps: int, pdl: bool) -> torch.Tensor:
    """h += adds (in place, 0-2 terms, summed in fp32 and rounded once), then return layer_norm(h).

    h is [rows, features]; each term is a vector added to every row (biases) or a tensor of rows shaped
    like h (rows may be strided).
    """
    x = torch.empty_like(h)
    first, second = (tuple(adds) + (h, h))[:2]
    strides = [0 if t.dim() == 1 else t.stride(0) for t in (first, second)]
    _add_layer_norm_kernel[(h.shape[0],)](
        h, first, second, weight, shift, x, h.shape[1], h.stride(0), *strides, eps, ADDS=len(adds),
        BLOCK=triton.next_power_of_2(h.shape[1]), num_warps=warps, **pdl_options(pdl))
    return x


if triton is not None:
    from pipeline.kernels.pdl import wait_for_inputs

    @triton.jit
    def layer_norm_row(h, valid, cols, N, w_ptr, b_ptr, eps):
        """layer_norm(h) * w + b in fp32, for a row h of N features held as fp32 (0 where not valid)."""
        mean = tl.sum(h, axis=0) / N
        centred = tl.where(valid, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        return centred * rstd * w + b

    @triton.jit
    def _add_layer_norm_kernel(h_ptr, a_ptr, b2_ptr, w_ptr, b_ptr, x_ptr, N, stride, a_stride, b2_stride, eps,
                               ADDS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One row: h += a (+ b2) (summed in fp32, stored back rounded once), x = layer_norm(h).

        A stride of 0: one vector for every row (biases); else a tensor of rows (a layer's output)."""
        if PDL:
            wait_for_inputs()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        valid = cols < N
        h = tl.load(h_ptr + row * stride + cols, mask=valid, other=0.0)
        if ADDS > 0:
            total = h.to(tl.float32) + tl.load(a_ptr + row * a_stride + cols, mask=valid, other=0.0).to(tl.float32)
            if ADDS > 1:
                total += tl.load(b2_ptr + row * b2_stride + cols, mask=valid, other=0.0).to(tl.float32)
            h = total.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * stride + cols, h, mask=valid)
        x = layer_norm_row(h.to(tl.float32), valid, cols, N, w_ptr, b_ptr, eps)
        tl.store(x_ptr + row * stride + cols, x.to(x_ptr.dtype.element_ty), mask=valid)
