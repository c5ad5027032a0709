"""Triton kernels of the fast Marian decoder (mt/fast_marian.py) and their thin launchers.

Three parts of a decode step: "attention", one query row per (row, head) against the cache (SDPA's
tiles are 64 query rows wide and waste most of their work here), which also reads beam search's
history through parent pointers (the row each cached position came from), so the cache is never
reordered; "norm", the residual add fused into the layer norm; and "top", the vocabulary's argmax
and beam search's top-k in two stages (each chunk's best, then the best chunks'), with the
log-softmax normaliser from the same pass, so the [rows, vocab] log probabilities are never written.

They run on CUDA; the tests also run them on the CPU in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

try:   # on the CUDA machines; the CPU path needs none of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

TOP_BLOCK = 2048          # vocabulary columns per program of the two-stage argmax / top-k
ATTENTION_BLOCK = 64      # cache positions per iteration of the decode-attention kernel


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int, heads: int,
                     stride_t: int, stride_r: int, origin: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None, group: int = 1) -> torch.Tensor:
    """Attention of one query row per (row, head) over `span` cached positions: [rows, d_model].

    q: [rows, d_model]. k, v: position t of key row r at offset t * stride_t + r * stride_r (then
    head, head_dim contiguous). Row r reads key row r // group (a sentence's beams share its
    encoder keys), or, given `origin` [positions, rows], key row origin[t, r] at position t (beam
    search's parent pointers). `lengths` [key rows]: positions past a row's length are masked.
    """
    rows, width = q.shape
    head_dim = width // heads
    out = torch.empty_like(q)
    _decode_attention_kernel[(rows, heads)](
        q, k, v, out, origin if origin is not None else q, lengths if lengths is not None else q,
        span, stride_t, stride_r, origin.stride(0) if origin is not None else 0, head_dim ** -0.5,
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), GROUP=group,
        USE_ORIGIN=origin is not None, USE_LENGTHS=lengths is not None, BLOCK_N=ATTENTION_BLOCK,
        num_warps=4)
    return out


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """layer_norm(x + y) over the last dim of [rows, width] tensors, in one pass."""
    rows, width = x.shape
    out = torch.empty_like(x)
    _add_layer_norm_kernel[(rows,)](x, y, weight, bias, out, width, eps,
                                    BLOCK=triton.next_power_of_2(width), num_warps=4)
    return out


def chunk_top(logits: torch.Tensor, pad: int, k: int, stats: bool = False):
    """Two-stage top-k of each row of logits [rows, vocab], pad excluded.

    k == 1 (greedy): (values, index) [rows, 1] of each row's first largest logit. Else (values,
    index) [rows, chunks * k] hold each chunk's k best (float32 logits, vocabulary ids), a superset
    of the row's k best; with `stats`, also each chunk's max and sum of exp(logit - max) [rows,
    chunks], pad included (generate masks pad after the softmax).
    """
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, TOP_BLOCK)
    values = torch.empty(rows, chunks * k, dtype=torch.float32, device=logits.device)
    index = torch.empty(rows, chunks * k, dtype=torch.long, device=logits.device)
    chunk_max = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device) if stats else values
    chunk_sum = torch.empty_like(chunk_max) if stats else values
    _chunk_top_kernel[(rows, chunks)](logits, values, index, chunk_max, chunk_sum, vocab, logits.stride(0),
                                      pad, K=k, STATS=stats, BLOCK=TOP_BLOCK, num_warps=8)
    if k == 1:   # the first chunk holding the row's maximum: argmax's first-index tie rule
        best = values.argmax(1, keepdim=True)
        return torch.gather(values, 1, best), torch.gather(index, 1, best)
    return (values, index, chunk_max, chunk_sum) if stats else (values, index)


if triton is not None:
    from pipeline.kernels.norm import layer_norm_row

    @triton.jit(do_not_specialize=["span"])
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, origin_ptr, lengths_ptr, span,
                                 stride_t, stride_r, stride_origin, scale,
                                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 GROUP: tl.constexpr, USE_ORIGIN: tl.constexpr, USE_LENGTHS: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        valid_d = d < HEAD_DIM
        q_offset = row * HEADS * HEAD_DIM + head * HEAD_DIM
        q = tl.load(q_ptr + q_offset + d, mask=valid_d, other=0.0).to(tl.float32) * scale
        key_row = row // GROUP
        end = span
        if USE_LENGTHS:
            end = tl.minimum(span, tl.load(lengths_ptr + key_row).to(tl.int32))
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in tl.range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = n < end
            if USE_ORIGIN:   # beam search: each position from the row it was written by
                source = tl.load(origin_ptr + n * stride_origin + row, mask=valid_n, other=0).to(tl.int64)
            else:
                source = tl.zeros([BLOCK_N], dtype=tl.int64) + key_row
            offs = n[:, None].to(tl.int64) * stride_t + source[:, None] * stride_r + head * HEAD_DIM + d[None, :]
            both = valid_n[:, None] & valid_d[None, :]
            k = tl.load(k_ptr + offs, mask=both, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=both, other=0.0).to(tl.float32)
            scores = tl.where(valid_n, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        tl.store(o_ptr + q_offset + d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=valid_d)

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        valid = cols < N
        # The sum rounded to the tensors' dtype first, as torch's x + y then layer_norm would.
        h = (tl.load(x_ptr + row * N + cols, mask=valid, other=0.0)
             + tl.load(y_ptr + row * N + cols, mask=valid, other=0.0)).to(tl.float32)
        out = layer_norm_row(h, valid, cols, N, w_ptr, b_ptr, eps)
        tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _chunk_top_kernel(x_ptr, val_ptr, idx_ptr, max_ptr, sum_ptr, vocab, stride, pad,
                          K: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        chunks = tl.num_programs(1)
        local = tl.arange(0, BLOCK)
        cols = chunk * BLOCK + local
        x = tl.load(x_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab,
                    other=float("-inf")).to(tl.float32)
        if STATS:
            top = tl.max(x, axis=0)
            tl.store(max_ptr + row * chunks + chunk, top)
            tl.store(sum_ptr + row * chunks + chunk, tl.sum(tl.exp(x - top), axis=0))
        x = tl.where(cols == pad, float("-inf"), x)
        out = (row * chunks + chunk) * K
        for j in tl.static_range(K):   # K rounds of argmax, each taking its winner out
            value, at = tl.max(x, axis=0, return_indices=True)
            tl.store(val_ptr + out + j, value)
            tl.store(idx_ptr + out + j, (chunk * BLOCK + at).to(tl.int64))
            x = tl.where(local == at, float("-inf"), x)
