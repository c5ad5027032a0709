"""phi-2's forward pass written for generation: a prefill over padded prompts and a one-token decode step.

Only the model math lives here; the loop, the cache's lifetime, CUDA graphs and sampling are in
`fast_generate.py`. Both functions read the weights of a transformers `PhiForCausalLM` in place and
write keys and values into a preallocated cache shaped [layers, batch, heads, max_seq, head_dim].

Rows are left-padded: every row's next token lands in the same cache column `col`, and row b's valid
keys are the columns start[b]..col. The decode step reads its inputs from tensors only (no Python
numbers that change between steps), so one CUDA graph per batch size can replay it for every token.

On CUDA with Triton, two small kernels replace the rotary/cache-write ops and the attention over the
cache: the attention kernel reads only each row's valid columns (split along the sequence, as in
flash-decoding), where scaled_dot_product_attention would read the whole cache under a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # absent on CPU-only installs; the torch path below serves there
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


@dataclass
class PhiLayer:
    ln_w: torch.Tensor
    ln_b: torch.Tensor
    qkv_w: torch.Tensor  # [3 * hidden, hidden]: q, k, v projections stacked (see fuse_qkv)
    qkv_b: torch.Tensor
    dense_w: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    out_b: torch.Tensor  # dense bias + fc2 bias: both land on the residual stream


@dataclass
class PhiWeights:
    layers: list[PhiLayer]
    embed: torch.Tensor
    final_ln_w: torch.Tensor
    final_ln_b: torch.Tensor
    lm_w: torch.Tensor
    lm_b: torch.Tensor
    heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    eps: float

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def rope_settings(config) -> tuple[float, float]:
    """(partial_rotary_factor, rope_theta) from transformers 4.x or 5.x configs."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5))
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(factor), float(theta)


def _fused_parameter(linears) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the q, k, v projections into one tensor and point the modules at views of it.

    One matrix product instead of three at every step, without a second copy of the weights: the old
    tensors are freed as the modules take the views, and the model still runs as before.
    """
    weights = [lin.weight for lin in linears]
    base = weights[0].untyped_storage().data_ptr()
    stride = weights[0].numel() * weights[0].element_size()
    already = all(w.untyped_storage().data_ptr() == base and w.storage_offset() * w.element_size() == i * stride
                  for i, w in enumerate(weights)) and weights[0].storage_offset() == 0
    if already:
        rows = sum(w.shape[0] for w in weights)
        weight = weights[0].as_strided((rows, weights[0].shape[1]), weights[0].stride(), 0)
    else:
        weight = torch.cat([w.detach() for w in weights])
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[start:start + rows]
            start += rows
    bias = torch.cat([lin.bias.detach() for lin in linears])  # small: 3 * hidden values
    return weight.detach(), bias


def phi_weights(model) -> PhiWeights:
    """Views of a PhiForCausalLM's weights in the layout the step functions use."""
    config = model.config
    factor, theta = rope_settings(config)
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv_w, qkv_b = _fused_parameter([attn.q_proj, attn.k_proj, attn.v_proj])
        layers.append(PhiLayer(
            ln_w=block.input_layernorm.weight.detach(), ln_b=block.input_layernorm.bias.detach(),
            qkv_w=qkv_w, qkv_b=qkv_b, dense_w=attn.dense.weight.detach(),
            fc1_w=mlp.fc1.weight.detach(), fc1_b=mlp.fc1.bias.detach(), fc2_w=mlp.fc2.weight.detach(),
            out_b=(attn.dense.bias + mlp.fc2.bias).detach(),
        ))
    return PhiWeights(
        layers=layers, embed=model.model.embed_tokens.weight.detach(),
        final_ln_w=model.model.final_layernorm.weight.detach(),
        final_ln_b=model.model.final_layernorm.bias.detach(),
        lm_w=model.lm_head.weight.detach(), lm_b=model.lm_head.bias.detach(),
        heads=heads, head_dim=head_dim, rotary_dim=int(head_dim * factor), rope_theta=theta,
        eps=config.layer_norm_eps,
    )


def rope_tables(w: PhiWeights, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [positions, rotary_dim], computed as transformers does (fp32, then the model dtype)."""
    dim = w.rotary_dim
    inv_freq = 1.0 / (w.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(w.device, w.dtype), emb.sin().to(w.device, w.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding on the first rotary_dim features of each head (phi's partial rotary)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_linear serves this product (few rows, shapes its tiles divide)."""
    return (x.shape[0] <= SKINNY_MAX_ROWS and weight.shape[0] % SKINNY_BLOCK_N == 0
            and weight.shape[1] % SKINNY_BLOCK_K == 0)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, gelu: bool = False,
            use_triton: bool = False) -> torch.Tensor:
    """[gelu_new](x @ weight.T + bias) for 2-D x."""
    if use_triton and _skinny_ok(x, weight):
        return skinny_linear(x, weight, bias, gelu=gelu)
    out = torch.addmm(bias, x, weight.t())
    return F.gelu(out, approximate="tanh") if gelu else out


def _mlp_and_residual(layer: PhiLayer, x: torch.Tensor, attn: torch.Tensor, h: torch.Tensor,
                      use_triton: bool = False) -> torch.Tensor:
    """h += dense(attn) + fc2(gelu_new(fc1(x))), in place, without the two biases.

    phi's block is parallel: both branches land on the residual stream, so the GEMMs accumulate into
    h directly (in place, so cuBLAS does not first copy h). The biases (summed in out_b) are added by
    the next layer norm (`_add_layer_norm`), which saves a kernel per layer.
    """
    width = h.shape[-1]
    h2, x2 = h.view(-1, width), x.view(-1, width)
    h2.addmm_(attn.reshape(-1, attn.shape[-1]), layer.dense_w.t())
    up = _linear(x2, layer.fc1_w, layer.fc1_b, gelu=True, use_triton=use_triton)
    h2.addmm_(up, layer.fc2_w.t())
    return h


def _add_layer_norm(h: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor, shift: torch.Tensor,
                    eps: float, use_triton: bool = False) -> torch.Tensor:
    """h += bias (in place, the previous layer's pending biases), then return layer_norm(h)."""
    if use_triton and h.dim() == 2:
        x = torch.empty_like(h)
        _add_layer_norm_kernel[(h.shape[0],)](
            h, bias if bias is not None else h, weight, shift, x, h.shape[1], h.stride(0), eps,
            HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(h.shape[1]), num_warps=4)
        return x
    if bias is not None:
        h.add_(bias)
    return F.layer_norm(h, h.shape[-1:], weight, shift, eps)


def _logits(w: PhiWeights, h: torch.Tensor, bias: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    x = _add_layer_norm(h, bias, w.final_ln_w, w.final_ln_b, w.eps, use_triton)
    return torch.addmm(w.lm_b, x, w.lm_w.t())


def prefill(w: PhiWeights, ids: torch.Tensor, starts: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Run left-padded prompts ids [B, P], fill cache columns 0..P-1, return the last column's logits.

    starts[b] is the first real column of row b. k_cache/v_cache are [layers, B, heads, S, head_dim].
    """
    batch, width = ids.shape
    cols = torch.arange(width, device=ids.device)
    positions = (cols[None, :] - starts[:, None]).clamp_(min=0)
    cos_p, sin_p = cos[positions][:, None], sin[positions][:, None]  # [B, 1, P, rot]
    padded = bool((starts > 0).any())
    mask = None
    if padded:  # causal, no pad keys; a pad query sees itself so its (unused) row stays finite
        causal = cols[None, :] <= cols[:, None]
        real_key = cols[None, None, :] >= starts[:, None, None]
        mask = (causal[None] & real_key) | torch.eye(width, dtype=torch.bool, device=ids.device)[None]
        mask = mask[:, None]
    h = F.embedding(ids, w.embed)
    pending = None  # biases of the previous layer, not yet on the residual stream
    for index, layer in enumerate(w.layers):
        x = _add_layer_norm(h, pending, layer.ln_w, layer.ln_b, w.eps)
        qkv = F.linear(x, layer.qkv_w, layer.qkv_b).view(batch, width, 3, w.heads, w.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, P, head_dim]
        q = _rotate(q, cos_p, sin_p, w.rotary_dim)
        k = _rotate(k, cos_p, sin_p, w.rotary_dim)
        k_cache[index, :, :, :width] = k
        v_cache[index, :, :, :width] = v
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not padded)
        attn = attn.transpose(1, 2).reshape(batch, width, -1)
        h = _mlp_and_residual(layer, x, attn, h)
        pending = layer.out_b
    return _logits(w, h[:, -1].contiguous(), pending)


@dataclass
class DecodeState:
    """The tensors one decode step reads; fixed addresses, so a captured graph can replay the step."""

    tokens: torch.Tensor  # [B] long: the token to feed
    positions: torch.Tensor  # [B] long: its rotary position (col - start)
    col: torch.Tensor  # [1] long: the cache column it is written to
    starts: torch.Tensor  # [B] long: first valid cache column of each row
    k_cache: torch.Tensor  # [layers, B, heads, S, head_dim]
    v_cache: torch.Tensor


def decode_step(w: PhiWeights, s: DecodeState, cos: torch.Tensor, sin: torch.Tensor, *,
                use_triton: bool, kv_len: int | None = None, splits: int = 1) -> torch.Tensor:
    """One token for every row: write its key/value at column col, return logits [B, vocab].

    kv_len bounds the columns the torch attention path reads (col + 1 in eager mode; the whole cache
    when captured in a graph). The Triton path reads exactly start..col and ignores it.
    """
    batch = s.tokens.shape[0]
    h = F.embedding(s.tokens, w.embed)
    if not use_triton:
        kv_len = s.k_cache.shape[3] if kv_len is None else kv_len
        key_cols = torch.arange(kv_len, device=h.device)
        mask = ((key_cols[None, :] >= s.starts[:, None]) & (key_cols[None, :] <= s.col))[:, None, None]
        cos_p, sin_p = cos[s.positions][:, None, None], sin[s.positions][:, None, None]
    pending = None
    for index, layer in enumerate(w.layers):
        x = _add_layer_norm(h, pending, layer.ln_w, layer.ln_b, w.eps, use_triton)
        qkv = _linear(x, layer.qkv_w, layer.qkv_b, use_triton=use_triton)
        k_cache, v_cache = s.k_cache[index], s.v_cache[index]
        if use_triton:
            attn = triton_attention(qkv, s, k_cache, v_cache, cos, sin, w, splits)
        else:
            q, k, v = qkv.view(batch, 3, w.heads, 1, w.head_dim).unbind(1)
            q = _rotate(q, cos_p, sin_p, w.rotary_dim)
            k_cache.index_copy_(2, s.col, _rotate(k, cos_p, sin_p, w.rotary_dim))
            v_cache.index_copy_(2, s.col, v)
            attn = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len],
                                                  attn_mask=mask)
            attn = attn.reshape(batch, -1)
        h = _mlp_and_residual(layer, x, attn, h, use_triton)
        pending = layer.out_b
    return _logits(w, h, pending, use_triton)


# ----------------------------------------------------------------------------------------------
# Triton kernels for the decode step (CUDA only).

# Tile choices measured on an H100 at phi-2's shape (benchmarks/llm_decode.py --profile): 32 columns per
# iteration with 2 warps read the cache fastest from batch 8 up (1.7-1.9 TB/s at batch 128, against
# 1.1-1.2 for 64 columns and 4 warps); at batch 1 the step is latency-bound and 4 warps do better.
ATTN_BLOCK_N = 32
SKINNY_MAX_ROWS = 16  # skinny_linear's tile holds 16 rows (the smallest tensor-core tile)
SKINNY_BLOCK_N, SKINNY_BLOCK_K = 16, 128


def attention_warps(rows: int) -> int:
    return 4 if rows < 8 else 2


def attention_splits(rows: int, heads: int) -> int:
    """Sequence splits per (row, head): about 1,024 programs, at most 8 splits."""
    splits = 1
    while rows * heads * splits < 1024 and splits < 8:
        splits *= 2
    return splits

def triton_attention(qkv: torch.Tensor, s: DecodeState, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, w: PhiWeights, splits: int) -> torch.Tensor:
    """Rotary + cache write, then attention of each row's query over its valid cache columns."""
    batch, heads, head_dim = qkv.shape[0], w.heads, w.head_dim
    block_d = triton.next_power_of_2(head_dim)
    q = torch.empty((batch, heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _rope_write_kernel[(batch, heads)](
        qkv, q, k_cache, v_cache, cos, sin, s.positions, s.col,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEADS=heads, HEAD_DIM=head_dim, ROT=w.rotary_dim, BLOCK_D=block_d,
    )
    out = torch.empty((batch, heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    partial = torch.empty((batch * heads, splits, head_dim), device=qkv.device, dtype=torch.float32)
    m = torch.empty((batch * heads, splits), device=qkv.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _attn_split_kernel[(batch * heads, splits)](
        q, k_cache, v_cache, s.starts, s.col, partial, m, l, out,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 1.0 / math.sqrt(head_dim),
        HEADS=heads, HEAD_DIM=head_dim, SPLITS=splits, BLOCK_N=ATTN_BLOCK_N, BLOCK_D=block_d,
        num_warps=attention_warps(batch),
    )
    if splits == 1:  # the split kernel wrote the output itself
        return out
    _attn_merge_kernel[(batch * heads,)](partial, m, l, out, HEAD_DIM=head_dim, SPLITS=splits,
                                         BLOCK_S=max(2, splits), BLOCK_D=block_d, num_warps=1)
    return out


if triton is not None:

    @triton.jit
    def _rope_write_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, col_ptr,
                           stride_qkv, stride_cb, stride_ch, stride_cs,
                           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        valid = d < HEAD_DIM
        half: tl.constexpr = ROT // 2
        rotated = d < ROT
        # rotate_half: feature i < half pairs with i + half (negated), i in [half, ROT) with i - half
        partner = tl.where(d < half, d + half, tl.where(rotated, d - half, d))
        sign = tl.where(d < half, -1.0, 1.0)
        pos = tl.load(pos_ptr + b)
        cos = tl.load(cos_ptr + pos * ROT + d, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * ROT + d, mask=rotated, other=0.0).to(tl.float32)
        sin = sin * sign
        base = qkv_ptr + b * stride_qkv + h * HEAD_DIM
        q = tl.load(base + d, mask=valid, other=0.0).to(tl.float32)
        q_p = tl.load(base + partner, mask=valid, other=0.0).to(tl.float32)
        k = tl.load(base + HEADS * HEAD_DIM + d, mask=valid, other=0.0).to(tl.float32)
        k_p = tl.load(base + HEADS * HEAD_DIM + partner, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(base + 2 * HEADS * HEAD_DIM + d, mask=valid, other=0.0)
        tl.store(q_ptr + (b * HEADS + h) * HEAD_DIM + d, (q * cos + q_p * sin).to(q_ptr.dtype.element_ty),
                 mask=valid)
        col = tl.load(col_ptr)
        dst = b * stride_cb + h * stride_ch + col * stride_cs + d
        tl.store(k_cache_ptr + dst, (k * cos + k_p * sin).to(k_cache_ptr.dtype.element_ty), mask=valid)
        tl.store(v_cache_ptr + dst, v, mask=valid)

    @triton.jit
    def _attn_split_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, col_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
                           stride_cb, stride_ch, stride_cs, scale,
                           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HEADS
        h = bh % HEADS
        start = tl.load(starts_ptr + b)
        end = tl.load(col_ptr) + 1
        chunk = tl.cdiv(tl.cdiv(end - start, SPLITS), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
        d = tl.arange(0, BLOCK_D)
        valid_d = d < HEAD_DIM
        q = tl.load(q_ptr + bh * HEAD_DIM + d, mask=valid_d, other=0.0).to(tl.float32) * scale
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        base = b * stride_cb + h * stride_ch
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = n < hi
            offs = base + n[:, None] * stride_cs + d[None, :]
            both = valid_n[:, None] & valid_d[None, :]
            k = tl.load(k_ptr + offs, mask=both, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=both, other=0.0).to(tl.float32)  # in flight with k
            scores = tl.where(valid_n, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        if SPLITS == 1:
            tl.store(out_ptr + bh * HEAD_DIM + d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=valid_d)
        else:
            tl.store(o_ptr + (bh * SPLITS + split) * HEAD_DIM + d, acc, mask=valid_d)
            tl.store(m_ptr + bh * SPLITS + split, m_i)
            tl.store(l_ptr + bh * SPLITS + split, l_i)

    @triton.jit
    def _attn_merge_kernel(o_ptr, m_ptr, l_ptr, out_ptr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
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
        tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    @triton.jit
    def _add_layer_norm_kernel(h_ptr, bias_ptr, w_ptr, b_ptr, x_ptr, N, stride, eps,
                               HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """One row: h += bias (stored back, rounded as torch would), x = layer_norm(h)."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        valid = cols < N
        h = tl.load(h_ptr + row * stride + cols, mask=valid, other=0.0)
        if HAS_BIAS:
            h = (h.to(tl.float32) + tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32))
            h = h.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * stride + cols, h, mask=valid)
        h = h.to(tl.float32)
        mean = tl.sum(h, axis=0) / N
        centred = tl.where(valid, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * stride + cols, (centred * rstd * w + b).to(x_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                              stride_x, stride_w, stride_r, stride_y,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GELU: tl.constexpr):
        """y = [gelu](x @ w.T + b) [+ r] for few rows of x: streams w once, epilogue fused."""
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
        if HAS_BIAS:
            acc += tl.load(b_ptr + n)[None, :].to(tl.float32)
        if GELU:  # gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh via exp
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
        mask = m[:, None] < M
        if HAS_RES:
            acc += tl.load(r_ptr + m[:, None] * stride_r + n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, gelu: bool = False, *, block_n: int = SKINNY_BLOCK_N,
                  block_k: int = SKINNY_BLOCK_K, warps: int = 2, stages: int = 4) -> torch.Tensor:
    """[gelu](x @ weight.T + bias) [+ residual] for x of at most 16 rows (the decode step's GEMMs).

    Measured on an H100 at phi-2's shapes it reads the qkv and fc1 weights a few percent faster than
    cuBLAS and saves fc1's separate GELU kernel; cuBLAS stays faster for dense and fc2 (N = 2560
    gives this kernel too few programs), so those stay on cuBLAS.
    """
    rows, inner = x.shape
    out_features = weight.shape[0]
    assert rows <= 16 and out_features % block_n == 0 and inner % block_k == 0
    y = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    _skinny_linear_kernel[(out_features // block_n,)](
        x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
        rows, out_features, inner, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, GELU=gelu, num_warps=warps, num_stages=stages,
    )
    return y
