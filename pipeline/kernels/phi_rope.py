"""phi-2's partial rotary embedding and cache write as a Triton kernel (the prefill's, and the decode
step's where attention runs as a kernel of its own), with the MLP's GELU share where asked for.

The kernels know heads and head sizes only through `HeadShape` (PhiWeights has these fields): they sit
below the model code and import nothing from it.
"""

from __future__ import annotations

from typing import Protocol

import torch

try:  # absent on CPU-only installs, where the model code takes its torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class HeadShape(Protocol):
    heads: int
    head_dim: int
    rotary_dim: int  # features of each head that the rotary embedding turns (phi-2: 32 of 80)


def gelu_share_args(gelu: tuple[torch.Tensor, torch.Tensor] | None, qkv: torch.Tensor, heads: int):
    """The kernels' GELU arguments (src, dst, their row strides, width, columns per head program) and the
    block that holds one program's share; with no GELU asked for, placeholders the kernel never reads."""
    src, dst = gelu if gelu is not None else (qkv, qkv)
    per_head = -(-src.shape[1] // heads) if gelu is not None else 1
    args = (src, dst, src.stride(0), dst.stride(0), src.shape[1] if gelu is not None else 0, per_head)
    return args, triton.next_power_of_2(per_head)


def rope_and_cache_write(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, positions: torch.Tensor, col: torch.Tensor, tokens: int, w: HeadShape,
                         gelu: tuple[torch.Tensor, torch.Tensor] | None = None, *, warps: int,
                         table: torch.Tensor | None = None, block_size: int = 0) -> torch.Tensor:
    """Rotary and cache write for `tokens` consecutive tokens per batch row.

    qkv [batch * tokens, >= 3 * hidden] (rows may be strided), positions [batch * tokens] (each
    token's rotary position); token t of row b goes to cache column col + t, where col has one
    element (every row's) or one per batch row. The cache is [batch, heads, columns, head_dim] (the
    prefill's scratch), or with `table` the paged cache [blocks, heads, block_size, head_dim] whose
    row b's column c is in block table[b, c // block_size]. Returns the rotated
    queries, [batch, heads, tokens, head_dim]. gelu=(src, dst): also dst = gelu_new(src), row by row.
    """
    heads, head_dim = w.heads, w.head_dim
    q = torch.empty((qkv.shape[0] // tokens, heads, tokens, head_dim), device=qkv.device, dtype=qkv.dtype)
    gelu_args, block_g = gelu_share_args(gelu, qkv, heads)
    _rope_write_kernel[(qkv.shape[0], heads)](
        qkv, q, k_cache, v_cache, cos, sin, positions, col, col if table is None else table, qkv.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 0 if table is None else table.stride(0), tokens,
        *gelu_args, COL_STRIDE=0 if col.numel() == 1 else 1, HEADS=heads,
        HEAD_DIM=head_dim, ROT=w.rotary_dim, BLOCK_D=triton.next_power_of_2(head_dim), HAS_GELU=gelu is not None,
        BLOCK_G=block_g, PAGED=table is not None, BLOCK_SIZE=max(block_size, 1), num_warps=warps,
    )
    return q


if triton is not None:
    from pipeline.kernels.linear import gelu_new

    @triton.jit
    def gelu_share(g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, b, h,
                   BLOCK_G: tl.constexpr):
        """Program (b, h)'s share of row b's MLP activation (gelu_new)."""
        g = h * per_head + tl.arange(0, BLOCK_G)
        in_row = (g < (h + 1) * per_head) & (g < inner)
        x = tl.load(g_src_ptr + b * stride_g_src + g, mask=in_row, other=0.0).to(tl.float32)
        tl.store(g_dst_ptr + b * stride_g_dst + g, gelu_new(x).to(g_dst_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def rotated(base, d, cos_ptr, sin_ptr, pos, ROT: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Features d of the head at `base` after phi's partial rotary embedding, in fp32 (0 past the head).

        rotate_half: feature i < ROT/2 pairs with i + ROT/2 (negated), i in [ROT/2, ROT) with i - ROT/2;
        features from ROT on pass through (cos 1, sin 0).
        """
        half: tl.constexpr = ROT // 2
        valid = d < HEAD_DIM
        turned = d < ROT
        partner = tl.where(d < half, d + half, tl.where(turned, d - half, d))
        cos = tl.load(cos_ptr + pos * ROT + d, mask=turned, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * ROT + d, mask=turned, other=0.0).to(tl.float32)
        sin = tl.where(d < half, -sin, sin)
        x = tl.load(base + d, mask=valid, other=0.0).to(tl.float32)
        x_p = tl.load(base + partner, mask=valid, other=0.0).to(tl.float32)
        return x * cos + x_p * sin

    @triton.jit
    def _rope_write_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, col_ptr, table_ptr,
                           stride_qkv, stride_cb, stride_ch, stride_cs, stride_tb, tokens,
                           g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head,
                           COL_STRIDE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
                           BLOCK_D: tl.constexpr, HAS_GELU: tl.constexpr, BLOCK_G: tl.constexpr,
                           PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """One head of one token: rotary on q (to q, [batch, heads, tokens, head_dim]) and k, k and v
        into cache column col + (the token's place in its row), optionally the MLP's GELU share."""
        r = tl.program_id(0)  # qkv row: token r % tokens of batch row r // tokens
        h = tl.program_id(1)
        b = r // tokens
        t = r % tokens
        if HAS_GELU:
            gelu_share(g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, r, h, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        valid = d < HEAD_DIM
        pos = tl.load(pos_ptr + r)
        base = qkv_ptr + r * stride_qkv + h * HEAD_DIM
        q = rotated(base, d, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM)
        k = rotated(base + HEADS * HEAD_DIM, d, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM)
        v = tl.load(base + 2 * HEADS * HEAD_DIM + d, mask=valid, other=0.0)
        tl.store(q_ptr + ((b * HEADS + h) * tokens + t) * HEAD_DIM + d, q.to(q_ptr.dtype.element_ty), mask=valid)
        col = tl.load(col_ptr + b * COL_STRIDE) + t
        if PAGED:
            block = tl.load(table_ptr + b * stride_tb + col // BLOCK_SIZE)
            dst = block * stride_cb + h * stride_ch + (col % BLOCK_SIZE) * stride_cs + d
        else:
            dst = b * stride_cb + h * stride_ch + col * stride_cs + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=valid)
        tl.store(v_cache_ptr + dst, v, mask=valid)
