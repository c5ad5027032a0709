"""Decode attention for phi-2 in Triton: each row's one query against its valid cache columns.

Row b's valid keys are its columns start[b]..col[b], and the kernels read only those, where
scaled_dot_product_attention would read the whole cache under a mask. The cache is paged
(llm/blocks.py, llm/answer_cache.py): a layer's keys are [blocks, heads, block_size, head_dim], and
row b's column c is at offset c % block_size of block table[b, c // block_size]; a tile of BLOCK_N
columns (block_size a multiple of it) lies in one block, so each tile costs one lookup in the table
(or none: with `table_once` the kernel reads the row's table before its loop, and with `consecutive`
a row whose blocks follow one another runs a loop that finds them by arithmetic; which is faster is
benchmarks/block_table_study.py's question).
`col` is one column for every row (shape [1]) or one per row ([B]). The engine's
form (`AttentionConfig("dot")`, one split, rope inside) is one kernel per layer that also applies the
rotary embedding to the step's query and key and writes the key and value to the cache. The other
forms are the tuner's alternatives, reachable only through an AttentionConfig or the `rope_inside`
argument (benchmarks/llm_decode.py --tune-attention, benchmarks/decode_step_study.py): a rotary
kernel (phi_rope.py) and an attention kernel, on CUDA cores ("sum") or split along the sequence
and merged by a second kernel, as in flash-decoding.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from pipeline.kernels.attention_tiles import AttentionConfig, head_split
from pipeline.kernels.pdl import pdl_options
from pipeline.kernels.phi_rope import HeadShape, gelu_share_args, rope_and_cache_write

try:  # absent on CPU-only installs, where the model code takes its torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class StepColumns(Protocol):
    """Where the step writes and what each row reads (the decode state's tensors)."""

    positions: torch.Tensor  # [B] long: each row's rotary position
    starts: torch.Tensor  # [B] long: each row's first valid column
    col: torch.Tensor  # [1] or [B] long: the column this step writes (shared, or each row's own)
    table: torch.Tensor  # [B, blocks per row] long: each row's blocks, in column order
    block_size: int  # columns per block


def col_stride(col: torch.Tensor) -> int:
    """0 where every row writes the same column (col has one element), else 1 (one per row)."""
    return 0 if col.numel() == 1 else 1


def triton_attention(qkv: torch.Tensor, s: StepColumns, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, w: HeadShape, config: AttentionConfig,
                     out: torch.Tensor | None = None, gelu: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                     rope_inside: bool = True, rope_warps: int = 1, pdl: bool = False) -> torch.Tensor:
    """Rotary + cache write, then attention of each row's query over its valid cache columns.

    Writes [batch, heads * head_dim] into `out` (rows may be strided, e.g. a block of columns of a
    wider tensor) or a new tensor. gelu=(src, dst): also dst = gelu_new(src) (the MLP's activation,
    [batch, inner], rows may be strided), done by the rotary part to save a launch per layer.
    rope_inside: the "dot" kernel with one split does the rotary and cache write itself (one launch);
    otherwise a rotary kernel of `rope_warps` warps runs first. pdl: the one-kernel form is launched
    with programmatic dependent launch (pdl.py).
    """
    batch, heads, head_dim = qkv.shape[0], w.heads, w.head_dim
    # a tile lies in one block, or (read per tile: each column's block is looked up) covers whole blocks
    if s.block_size % config.block_n and (config.table_once or config.block_n % s.block_size):
        raise ValueError(f"a tile of {config.block_n} columns must lie in one block of {s.block_size}"
                         + ("" if config.table_once else " or cover whole blocks"))
    if config.consecutive and not (config.table_once and config.kernel == "dot"):
        raise ValueError("consecutive blocks are found in the table read once, by the dot kernel")
    gelu_args, block_g = gelu_share_args(gelu, qkv, heads)
    # k_cache: [blocks, heads, block_size, head_dim]; then the table's row stride
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), s.table.stride(0))
    # fp32 caches (the tiny test models) keep full precision in tl.dot: no tf32
    precision = "ieee" if k_cache.dtype == torch.float32 else None
    splits = config.splits
    d0, d1 = head_split(head_dim, config.split_dims)
    table_width = triton.next_power_of_2(s.table.shape[1]) if config.table_once else 0
    if out is None:
        out = torch.empty((batch, heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    if config.kernel == "dot" and splits == 1 and rope_inside:
        _rope_attn_kernel[(batch * heads,)](
            qkv, k_cache, v_cache, cos, sin, s.positions, s.starts, s.col, s.table, out, qkv.stride(0), *cache_strides,
            1.0 / math.sqrt(head_dim), out.stride(0), *gelu_args, COL_STRIDE=col_stride(s.col), HEADS=heads,
            HEAD_DIM=head_dim, ROT=w.rotary_dim, BLOCK_N=config.block_n, D0=d0, D1=max(d1, 16), HAS_TAIL=d1 > 0,
            STAGES=config.stages, PRECISION=precision, HAS_GELU=gelu is not None, BLOCK_SIZE=s.block_size,
            TABLE_WIDTH=table_width, CONSECUTIVE=config.consecutive, BLOCK_G=block_g, num_warps=config.warps,
            num_stages=max(config.stages, 1), **pdl_options(pdl))
        return out
    q = rope_and_cache_write(qkv, k_cache, v_cache, cos, sin, s.positions, s.col, 1, w, gelu, warps=rope_warps,
                             table=s.table, block_size=s.block_size)
    partial = torch.empty((batch * heads, splits, head_dim), device=qkv.device, dtype=torch.float32)
    m = torch.empty((batch * heads, splits), device=qkv.device, dtype=torch.float32)
    l = torch.empty_like(m)
    kernel = _attn_dot_kernel if config.kernel == "dot" else _attn_sum_kernel
    dot_only = {"CONSECUTIVE": config.consecutive} if config.kernel == "dot" else {}
    kernel[(batch * heads, splits)](
        q, k_cache, v_cache, s.starts, s.col, s.table, partial, m, l, out,
        *cache_strides, 1.0 / math.sqrt(head_dim), splits,
        out.stride(0), COL_STRIDE=col_stride(s.col), HEADS=heads, HEAD_DIM=head_dim, DIRECT=splits == 1,
        BLOCK_N=config.block_n, BLOCK_SIZE=s.block_size, D0=d0, D1=max(d1, 16), HAS_TAIL=d1 > 0, STAGES=config.stages,
        TABLE_WIDTH=table_width, num_warps=config.warps, PRECISION=precision, num_stages=max(config.stages, 1),
        **dot_only)
    if splits == 1:  # the split kernel wrote the output itself
        return out
    _attn_merge_kernel[(batch * heads,)](partial, m, l, out, out.stride(0), HEADS=heads, HEAD_DIM=head_dim,
                                         SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)),
                                         BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1)
    return out


if triton is not None:
    from pipeline.kernels.pdl import wait_for_inputs
    from pipeline.kernels.phi_rope import gelu_share, rotated

    @triton.jit
    def _split_columns(starts_ptr, col_ptr, b, split, n_splits, BLOCK_N: tl.constexpr, COL_STRIDE: tl.constexpr):
        """Cache columns [lo, hi) of row b that split `split` of n_splits reads (whole tiles each)."""
        start = tl.load(starts_ptr + b)
        end = tl.load(col_ptr + b * COL_STRIDE) + 1
        chunk = tl.cdiv(tl.cdiv(end - start, n_splits), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        return lo, tl.minimum(lo + chunk, end)

    @triton.jit
    def _first_tile(lo, hi, BLOCK_N: tl.constexpr):
        """The first tile of columns [lo, hi): lo rounded down to a whole tile (tiles must not cross a
        block), or hi where the range is empty, so no tile is read in which every column is masked
        (its scores all -inf would make the running max -inf and the online softmax NaN)."""
        return tl.where(lo < hi, (lo // BLOCK_N) * BLOCK_N, hi)

    @triton.jit
    def _row_blocks(table_row, hi, BLOCK_SIZE: tl.constexpr, TABLE_WIDTH: tl.constexpr):
        """With TABLE_WIDTH (a power of two >= the table's width), the blocks of the row's columns
        before `hi`, read once; else nothing (each tile reads its own)."""
        if TABLE_WIDTH:
            j = tl.arange(0, TABLE_WIDTH)
            blocks = tl.load(table_row + j, mask=j < tl.cdiv(hi, BLOCK_SIZE), other=0)
        else:
            blocks = 0
        return blocks

    @triton.jit
    def _consecutive(blocks, hi, BLOCK_SIZE: tl.constexpr, TABLE_WIDTH: tl.constexpr):
        """(the row's first block, whether its blocks before column `hi` are that one and the next ones
        in turn): read once from the row's table in registers, before the loop."""
        j = tl.arange(0, TABLE_WIDTH)
        base = tl.sum(tl.where(j == 0, blocks, 0), axis=0)
        strays = tl.sum(tl.where((j < tl.cdiv(hi, BLOCK_SIZE)) & (blocks != base + j), 1, 0), axis=0)
        return base, strays == 0

    @triton.jit
    def _tile(table_row, blocks, n0, head_off, stride_cb, stride_cs, BLOCK_N: tl.constexpr,
              BLOCK_SIZE: tl.constexpr, TABLE_WIDTH: tl.constexpr, AFFINE: tl.constexpr):
        """Offsets of a row's columns n0..n0+BLOCK_N-1 (n0 a multiple of BLOCK_N: one block holds them,
        or, read per tile, they cover whole blocks). AFFINE: `blocks` is the first of the row's
        consecutive blocks, so the tile's is found by arithmetic. Else with TABLE_WIDTH the tile's block
        comes from the row's `blocks` in registers, or else each column's block is loaded from the table
        (a vector load), and the key and value loads wait for it: at batch 1 that cost the kernels a
        third of their time on an H100 (benchmarks/block_table_study.py, docs/benchmarks.md)."""
        n = n0 + tl.arange(0, BLOCK_N)
        if AFFINE:
            block = blocks + n0 // BLOCK_SIZE
        elif TABLE_WIDTH:
            block = tl.sum(tl.where(tl.arange(0, TABLE_WIDTH) == n0 // BLOCK_SIZE, blocks, 0), axis=0)
        else:
            block = tl.load(table_row + n // BLOCK_SIZE)[:, None]
        return block * stride_cb + head_off + (n % BLOCK_SIZE)[:, None] * stride_cs

    @triton.jit
    def _attn_sum_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, col_ptr, table_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
                         stride_cb, stride_ch, stride_cs, stride_tb, scale, n_splits, stride_out,
                         COL_STRIDE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         HAS_TAIL: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                         TABLE_WIDTH: tl.constexpr):
        """Attention of one query over its columns on CUDA cores; head read as D0 (+ D1) columns."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HEADS
        h = bh % HEADS
        lo, hi = _split_columns(starts_ptr, col_ptr, b, split, n_splits, BLOCK_N, COL_STRIDE)
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        valid0 = d0 < HEAD_DIM  # all true unless the head is one padded tile
        q0 = tl.load(q_ptr + bh * HEAD_DIM + d0, mask=valid0, other=0.0).to(tl.float32) * scale
        q1 = tl.load(q_ptr + bh * HEAD_DIM + d1, mask=HAS_TAIL & (d1 < HEAD_DIM), other=0.0).to(tl.float32) * scale
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc0 = tl.zeros([D0], dtype=tl.float32)
        acc1 = tl.zeros([D1], dtype=tl.float32)
        table_row = table_ptr + b * stride_tb
        blocks = _row_blocks(table_row, hi, BLOCK_SIZE, TABLE_WIDTH)
        for n0 in tl.range(_first_tile(lo, hi, BLOCK_N), hi, BLOCK_N, num_stages=STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = (n >= lo) & (n < hi)
            offs = _tile(table_row, blocks, n0, h * stride_ch, stride_cb, stride_cs, BLOCK_N, BLOCK_SIZE, TABLE_WIDTH,
                         False)
            if D0 > HEAD_DIM:
                mask0 = valid_n[:, None] & valid0[None, :]
            else:
                mask0 = valid_n[:, None]
            k0 = tl.load(k_ptr + offs + d0[None, :], mask=mask0, other=0.0)
            v0 = tl.load(v_ptr + offs + d0[None, :], mask=mask0, other=0.0)  # in flight with k
            scores = tl.sum(k0.to(tl.float32) * q0[None, :], axis=1)
            if HAS_TAIL:
                k1 = tl.load(k_ptr + offs + d1[None, :], mask=valid_n[:, None], other=0.0)
                v1 = tl.load(v_ptr + offs + d1[None, :], mask=valid_n[:, None], other=0.0)
                scores += tl.sum(k1.to(tl.float32) * q1[None, :], axis=1)
            scores = tl.where(valid_n, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            acc0 = acc0 * alpha + tl.sum(p[:, None] * v0.to(tl.float32), axis=0)
            if HAS_TAIL:
                acc1 = acc1 * alpha + tl.sum(p[:, None] * v1.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        _attn_store(acc0, acc1, m_i, l_i, d0, d1, bh, b * stride_out + h * HEAD_DIM, split, n_splits, o_ptr,
                    m_ptr, l_ptr, out_ptr, HEAD_DIM, DIRECT, HAS_TAIL)

    @triton.jit
    def _attn_store(acc0, acc1, m_i, l_i, d0, d1, bh, out_row, split, n_splits, o_ptr, m_ptr, l_ptr, out_ptr,
                    HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr, HAS_TAIL: tl.constexpr):
        """The normalised output (one split) or this split's partial sums (several)."""
        valid0 = d0 < HEAD_DIM
        valid1 = HAS_TAIL & (d1 < HEAD_DIM)
        if DIRECT:
            tl.store(out_ptr + out_row + d0, (acc0 / l_i).to(out_ptr.dtype.element_ty), mask=valid0)
            tl.store(out_ptr + out_row + d1, (acc1 / l_i).to(out_ptr.dtype.element_ty), mask=valid1)
        else:
            row = (bh * n_splits + split) * HEAD_DIM
            tl.store(o_ptr + row + d0, acc0, mask=valid0)
            tl.store(o_ptr + row + d1, acc1, mask=valid1)
            tl.store(m_ptr + bh * n_splits + split, m_i)
            tl.store(l_ptr + bh * n_splits + split, l_i)

    @triton.jit
    def _attn_dot_loop(q0, q1, k_ptr, v_ptr, table_row, head_off, stride_cb, stride_cs, lo, hi, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D0: tl.constexpr,
                       D1: tl.constexpr, HAS_TAIL: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                       TABLE_WIDTH: tl.constexpr, CONSECUTIVE: tl.constexpr):
        """Online softmax of the query (q0 | q1, in the cache's dtype) over cache columns lo..hi-1 on
        tensor cores: the query is row 0 of a 16-row tile (rows 1-15 zero).

        Returns (acc0, acc1, m, l): the unnormalised output, the running max and the sum of weights.
        CONSECUTIVE: a row whose blocks are consecutive runs a loop that finds them by arithmetic; the
        others the loop through the table.
        """
        dtype = k_ptr.dtype.element_ty
        r = tl.arange(0, 16)
        first = r[:, None] == 0
        q0 = tl.where(first, q0[None, :], 0.0).to(dtype)
        q1 = tl.where(first, q1[None, :], 0.0).to(dtype)
        blocks = _row_blocks(table_row, hi, BLOCK_SIZE, TABLE_WIDTH)
        # (a branch on a tensor compiles both sides: the loop by arithmetic only where CONSECUTIVE)
        if CONSECUTIVE:
            base, runs = _consecutive(blocks, hi, BLOCK_SIZE, TABLE_WIDTH)
            if runs:
                acc0, acc1, m_i, l_i = _dot_tiles(q0, q1, k_ptr, v_ptr, table_row, base, head_off, stride_cb,
                                                  stride_cs, lo, hi, scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE, D0, D1,
                                                  HAS_TAIL, STAGES, PRECISION, TABLE_WIDTH, True)
            else:
                acc0, acc1, m_i, l_i = _dot_tiles(q0, q1, k_ptr, v_ptr, table_row, blocks, head_off, stride_cb,
                                                  stride_cs, lo, hi, scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE, D0, D1,
                                                  HAS_TAIL, STAGES, PRECISION, TABLE_WIDTH, False)
        else:
            acc0, acc1, m_i, l_i = _dot_tiles(q0, q1, k_ptr, v_ptr, table_row, blocks, head_off, stride_cb, stride_cs,
                                              lo, hi, scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE, D0, D1, HAS_TAIL, STAGES,
                                              PRECISION, TABLE_WIDTH, False)
        # row 0 holds the query's results
        out0 = tl.sum(tl.where(first, acc0, 0.0), axis=0)
        out1 = tl.sum(tl.where(first, acc1, 0.0), axis=0)
        m_0 = tl.max(tl.where(r == 0, m_i, float("-inf")), axis=0)
        l_0 = tl.sum(tl.where(r == 0, l_i, 0.0), axis=0)
        return out0, out1, m_0, l_0

    @triton.jit
    def _dot_tiles(q0, q1, k_ptr, v_ptr, table_row, blocks, head_off, stride_cb, stride_cs, lo, hi, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D0: tl.constexpr,
                   D1: tl.constexpr, HAS_TAIL: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                   TABLE_WIDTH: tl.constexpr, AFFINE: tl.constexpr):
        """_attn_dot_loop's loop over the tiles (16-row query tiles q0 | q1; `blocks` as _tile reads it).
        The loads feeding tl.dot are what Triton pipelines (cp.async into shared memory, STAGES deep),
        which keeps more of the cache in flight than plain register loads."""
        dtype = k_ptr.dtype.element_ty
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        valid0 = d0 < HEAD_DIM
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], dtype=tl.float32)
        acc0 = tl.zeros([16, D0], dtype=tl.float32)
        acc1 = tl.zeros([16, D1], dtype=tl.float32)
        for n0 in tl.range(_first_tile(lo, hi, BLOCK_N), hi, BLOCK_N, num_stages=STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = (n >= lo) & (n < hi)
            offs = _tile(table_row, blocks, n0, head_off, stride_cb, stride_cs, BLOCK_N, BLOCK_SIZE, TABLE_WIDTH,
                         AFFINE)
            if D0 > HEAD_DIM:
                mask0 = valid_n[:, None] & valid0[None, :]
            else:
                mask0 = valid_n[:, None]
            k0 = tl.load(k_ptr + offs + d0[None, :], mask=mask0, other=0.0)
            v0 = tl.load(v_ptr + offs + d0[None, :], mask=mask0, other=0.0)
            scores = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            if HAS_TAIL:
                k1 = tl.load(k_ptr + offs + d1[None, :], mask=valid_n[:, None], other=0.0)
                v1 = tl.load(v_ptr + offs + d1[None, :], mask=valid_n[:, None], other=0.0)
                scores += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            scores = tl.where(valid_n[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(dtype)
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PRECISION)
            if HAS_TAIL:
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)
            m_i = m_new
        return acc0, acc1, m_i, l_i

    @triton.jit
    def _attn_dot_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, col_ptr, table_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
                         stride_cb, stride_ch, stride_cs, stride_tb, scale, n_splits, stride_out,
                         COL_STRIDE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         HAS_TAIL: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                         TABLE_WIDTH: tl.constexpr, CONSECUTIVE: tl.constexpr):
        """As _attn_sum_kernel on tensor cores (_attn_dot_loop)."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HEADS
        h = bh % HEADS
        lo, hi = _split_columns(starts_ptr, col_ptr, b, split, n_splits, BLOCK_N, COL_STRIDE)
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        q0 = tl.load(q_ptr + bh * HEAD_DIM + d0, mask=d0 < HEAD_DIM, other=0.0)
        q1 = tl.load(q_ptr + bh * HEAD_DIM + d1, mask=HAS_TAIL & (d1 < HEAD_DIM), other=0.0)
        out0, out1, m_0, l_0 = _attn_dot_loop(q0, q1, k_ptr, v_ptr, table_ptr + b * stride_tb, h * stride_ch,
                                              stride_cb, stride_cs, lo, hi, scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE,
                                              D0, D1, HAS_TAIL, STAGES, PRECISION, TABLE_WIDTH, CONSECUTIVE)
        _attn_store(out0, out1, m_0, l_0, d0, d1, bh, b * stride_out + h * HEAD_DIM, split, n_splits, o_ptr,
                    m_ptr, l_ptr, out_ptr, HEAD_DIM, DIRECT, HAS_TAIL)

    @triton.jit
    def _rope_attn_kernel(qkv_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, starts_ptr, col_ptr, table_ptr, out_ptr,
                          stride_qkv, stride_cb, stride_ch, stride_cs, stride_tb, scale, stride_out,
                          g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, COL_STRIDE: tl.constexpr,
                          HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_N: tl.constexpr,
                          D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, STAGES: tl.constexpr,
                          PRECISION: tl.constexpr, HAS_GELU: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          TABLE_WIDTH: tl.constexpr, CONSECUTIVE: tl.constexpr, BLOCK_G: tl.constexpr,
                          PDL: tl.constexpr):
        """_rope_write_kernel and _attn_dot_kernel (one split) as one kernel: one launch per layer.

        The step's own key and value go to the cache for later steps, but this step takes them from
        registers: the loop reads the columns before `col`, and the new column joins the softmax last.
        """
        if PDL:
            wait_for_inputs()
        bh = tl.program_id(0)
        b = bh // HEADS
        h = bh % HEADS
        if HAS_GELU:
            gelu_share(g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, b, h, BLOCK_G)
        dtype = k_ptr.dtype.element_ty
        pos = tl.load(pos_ptr + b)
        col = tl.load(col_ptr + b * COL_STRIDE)
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        valid0 = d0 < HEAD_DIM
        valid1 = HAS_TAIL & (d1 < HEAD_DIM)
        row = qkv_ptr + b * stride_qkv + h * HEAD_DIM
        # rounded to the cache's dtype, as the two-kernel path stores and reads them back
        q0 = rotated(row, d0, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        q1 = rotated(row, d1, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        k0 = rotated(row + HEADS * HEAD_DIM, d0, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        k1 = rotated(row + HEADS * HEAD_DIM, d1, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        v0 = tl.load(row + 2 * HEADS * HEAD_DIM + d0, mask=valid0, other=0.0).to(dtype)
        v1 = tl.load(row + 2 * HEADS * HEAD_DIM + d1, mask=valid1, other=0.0).to(dtype)
        table_row = table_ptr + b * stride_tb
        cell = tl.load(table_row + col // BLOCK_SIZE) * stride_cb + h * stride_ch + (col % BLOCK_SIZE) * stride_cs
        tl.store(k_ptr + cell + d0, k0, mask=valid0)
        tl.store(v_ptr + cell + d0, v0, mask=valid0)
        tl.store(k_ptr + cell + d1, k1, mask=valid1)
        tl.store(v_ptr + cell + d1, v1, mask=valid1)
        acc0, acc1, m_i, l_i = _attn_dot_loop(q0, q1, k_ptr, v_ptr, table_row, h * stride_ch, stride_cb, stride_cs,
                                              tl.load(starts_ptr + b), col, scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE, D0,
                                              D1, HAS_TAIL, STAGES, PRECISION, TABLE_WIDTH, CONSECUTIVE)
        now = (tl.sum(q0.to(tl.float32) * k0.to(tl.float32), axis=0)
               + tl.sum(q1.to(tl.float32) * k1.to(tl.float32), axis=0)) * scale
        top = tl.maximum(m_i, now)
        earlier = tl.exp(m_i - top)  # 0 when there were no earlier columns (m_i = -inf)
        current = tl.exp(now - top)
        total = l_i * earlier + current
        out = out_ptr + b * stride_out + h * HEAD_DIM
        tl.store(out + d0, ((acc0 * earlier + v0.to(tl.float32) * current) / total).to(out_ptr.dtype.element_ty),
                 mask=valid0)
        tl.store(out + d1, ((acc1 * earlier + v1.to(tl.float32) * current) / total).to(out_ptr.dtype.element_ty),
                 mask=valid1)

    @triton.jit
    def _attn_merge_kernel(o_ptr, m_ptr, l_ptr, out_ptr, stride_out, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        m = tl.load(m_ptr + bh * SPLITS + sp, mask=sp < SPLITS, other=float("-inf"))
        l = tl.load(l_ptr + bh * SPLITS + sp, mask=sp < SPLITS, other=0.0)
        top = tl.max(m, axis=0)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # empty splits count for nothing
        o = tl.load(o_ptr + (bh * SPLITS + sp)[:, None] * HEAD_DIM + d[None, :],
                    mask=(sp[:, None] < SPLITS) & (d[None, :] < HEAD_DIM), other=0.0)
        out = tl.sum(weight[:, None] * o, axis=0) / tl.sum(weight * l, axis=0)
        row = (bh // HEADS) * stride_out + (bh % HEADS) * HEAD_DIM
        tl.store(out_ptr + row + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)
