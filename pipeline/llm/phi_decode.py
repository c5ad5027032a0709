"""phi-2's forward pass written for generation: a prefill over padded prompts and a one-token decode step.

Only the model math lives here; the loop, the cache's lifetime, CUDA graphs and sampling are in
`fast_generate.py`. Both functions read the weights of a transformers `PhiForCausalLM` in place and
write keys and values into a preallocated cache shaped [layers, batch, heads, max_seq, head_dim].

Rows are left-padded: every row's next token lands in the same cache column `col`, and row b's valid
keys are the columns start[b]..col. The decode step reads its inputs from tensors only (no Python
numbers that change between steps), so one CUDA graph per batch size can replay it for every token.

On CUDA with Triton, one kernel per layer replaces the rotary, cache-write and attention ops: it reads
only each row's valid cache columns, where scaled_dot_product_attention would read the whole cache
under a mask (a rotary kernel and an attention kernel split along the sequence, as in flash-decoding,
remain as the tuner's alternatives). At batch sizes past 16 rows the MLP runs on a second stream
beside attention (`_layer_mlp_beside`); without Triton a layer is two matrix products, [q k v fc1]
and [dense fc2], over weights stacked in place (`_fused_layer`). Either way the layer's outputs
are added to the residual stream by the next layer's norm kernel.
"""

from __future__ import annotations

import math
import os
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
    in_w: torch.Tensor  # [3 * hidden + inner, hidden]: q, k, v and fc1 stacked (all read the same x)
    in_b: torch.Tensor
    out_w: torch.Tensor  # [hidden, hidden + inner]: dense and fc2 side by side (both add to h)
    out_b: torch.Tensor  # dense bias + fc2 bias: both land on the residual stream
    dense_b: torch.Tensor
    fc2_b: torch.Tensor
    hidden: int

    # The single projections are views of the stacked tensors (no copies).
    @property
    def qkv_w(self) -> torch.Tensor:
        return self.in_w[:3 * self.hidden]

    @property
    def qkv_b(self) -> torch.Tensor:
        return self.in_b[:3 * self.hidden]

    @property
    def fc1_w(self) -> torch.Tensor:
        return self.in_w[3 * self.hidden:]

    @property
    def fc1_b(self) -> torch.Tensor:
        return self.in_b[3 * self.hidden:]

    @property
    def dense_w(self) -> torch.Tensor:
        return self.out_w[:, :self.hidden]

    @property
    def fc2_w(self) -> torch.Tensor:
        return self.out_w[:, self.hidden:]


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


def _stacked(weights: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The tensor whose consecutive blocks along `dim` the `weights` already are (views), else None."""
    first = weights[0]
    total = sum(w.shape[dim] for w in weights)
    shape = (total, first.shape[1]) if dim == 0 else (first.shape[0], total)
    strides = (shape[1], 1)
    offset = first.storage_offset()
    for w in weights:
        if (w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.stride() != strides
                or w.storage_offset() != offset):
            return None
        offset += w.shape[0] * strides[0] if dim == 0 else w.shape[1]
    return first.as_strided(shape, strides, first.storage_offset())


def _fused_parameter(linears, dim: int = 0) -> torch.Tensor:
    """Concatenate the modules' weights along `dim` and point the modules at views of the result.

    One matrix product instead of several at every step, without a second copy of the weights: the old
    tensors are freed as the modules take the views, and the model still runs as before (a block of
    columns is a strided view, which matrix products take as it is). Done once per model: a second
    engine on the same model finds the views and reuses them.
    """
    weights = [lin.weight.detach() for lin in linears]
    weight = _stacked(weights, dim)
    if weight is None:
        weight = torch.cat(weights, dim=dim)
        start = 0
        for lin in linears:
            size = lin.weight.shape[dim]
            lin.weight.data = weight.narrow(dim, start, size)
            start += size
    return weight


def phi_weights(model) -> PhiWeights:
    """Views of a PhiForCausalLM's weights in the layout the step functions use."""
    config = model.config
    factor, theta = rope_settings(config)
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        inputs = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc1]
        layers.append(PhiLayer(
            ln_w=block.input_layernorm.weight.detach(), ln_b=block.input_layernorm.bias.detach(),
            in_w=_fused_parameter(inputs), in_b=torch.cat([lin.bias.detach() for lin in inputs]),
            out_w=_fused_parameter([attn.dense, mlp.fc2], dim=1),
            out_b=(attn.dense.bias + mlp.fc2.bias).detach(), dense_b=attn.dense.bias.detach(),
            fc2_b=mlp.fc2.bias.detach(), hidden=config.hidden_size,
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


def _add_layer_norm(h: torch.Tensor, pending, weight: torch.Tensor, shift: torch.Tensor,
                    eps: float, use_triton: bool = False) -> torch.Tensor:
    """h += pending (in place), then return layer_norm(h).

    pending is what the previous layer has not yet added to the residual stream: None, its biases
    (a vector), its output (a tensor shaped like h), or its two branches' outputs (a pair, summed in
    fp32 before the one rounding to h's dtype).
    """
    adds = pending if isinstance(pending, tuple) else (pending,) if pending is not None else ()
    if use_triton and h.dim() == 2:
        x = torch.empty_like(h)
        first, second = (adds + (h, h))[:2]
        strides = [0 if t.dim() == 1 else t.stride(0) for t in (first, second)]
        _add_layer_norm_kernel[(h.shape[0],)](
            h, first, second, weight, shift, x, h.shape[1], h.stride(0), *strides, eps, ADDS=len(adds),
            BLOCK=triton.next_power_of_2(h.shape[1]), num_warps=NORM_WARPS, **_pdl())
        return x
    if len(adds) == 2:
        h.add_(adds[0].float() + adds[1])
    elif adds:
        h.add_(adds[0])
    return F.layer_norm(h, h.shape[-1:], weight, shift, eps)


def _logits(w: PhiWeights, h: torch.Tensor, pending, use_triton: bool = False) -> torch.Tensor:
    x = _add_layer_norm(h, pending, w.final_ln_w, w.final_ln_b, w.eps, use_triton)
    return torch.addmm(w.lm_b, x, w.lm_w.t())


def prefill(w: PhiWeights, ids: torch.Tensor, starts: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """Run left-padded prompts ids [B, P], fill cache columns 0..P-1, return the last column's logits.

    starts[b] is the first real column of row b. k_cache/v_cache are [layers, B, heads, S, head_dim].
    With use_triton, one kernel per layer does the rotary and the cache write (rope_and_cache_write),
    where torch takes a dozen elementwise kernels and copies. The two branches' outputs reach the
    residual stream through the next layer norm, as in the decode step.
    """
    batch, width = ids.shape
    cols = torch.arange(width, device=ids.device)
    positions = (cols[None, :] - starts[:, None]).clamp_(min=0)
    if use_triton:
        first_col = torch.zeros(1, dtype=torch.long, device=ids.device)  # token t of a row -> column t
    else:
        cos_p, sin_p = cos[positions][:, None], sin[positions][:, None]  # [B, 1, P, rot]
    padded = bool((starts > 0).any())
    mask = None
    if padded:  # causal, no pad keys; a pad query sees itself so its (unused) row stays finite
        causal = cols[None, :] <= cols[:, None]
        real_key = cols[None, None, :] >= starts[:, None, None]
        mask = (causal[None] & real_key) | torch.eye(width, dtype=torch.bool, device=ids.device)[None]
        mask = mask[:, None]
    tokens = batch * width
    h = F.embedding(ids, w.embed).view(tokens, -1)
    hidden = h.shape[-1]
    pending = None  # the previous layer's outputs, not yet on the residual stream
    for index, layer in enumerate(w.layers):
        x = _add_layer_norm(h, pending, layer.ln_w, layer.ln_b, w.eps, use_triton)
        qkv = torch.addmm(layer.qkv_b, x, layer.qkv_w.t())
        if use_triton:
            q = rope_and_cache_write(qkv, k_cache[index], v_cache[index], cos, sin, positions.view(-1), first_col,
                                     width, w)
            k, v = k_cache[index, :, :, :width], v_cache[index, :, :, :width]
        else:
            q, k, v = qkv.view(batch, width, 3, w.heads, w.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = _rotate(q, cos_p, sin_p, w.rotary_dim)  # each [B, heads, P, head_dim]
            k = _rotate(k, cos_p, sin_p, w.rotary_dim)
            k_cache[index, :, :, :width] = k
            v_cache[index, :, :, :width] = v
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not padded)
        attn = attn.transpose(1, 2).reshape(tokens, hidden)
        pending = (torch.addmm(layer.dense_b, attn, layer.dense_w.t()),
                   torch.addmm(layer.fc2_b, _fc1_gelu(layer, x), layer.fc2_w.t()))
    last = slice(width - 1, None, width)  # each row's last column
    return _logits(w, h[last].contiguous(), tuple(p[last] for p in pending), use_triton)


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
                use_triton: bool, kv_len: int | None = None,
                attention: AttentionConfig | None = None) -> torch.Tensor:
    """One token for every row: write its key/value at column col, return logits [B, vocab].

    kv_len bounds the columns the torch attention path reads (col + 1 in eager mode; the whole cache
    when captured in a graph). The Triton path reads exactly start..col and ignores it; `attention`
    picks its kernel and tiles (default: attention_config for this batch size).
    """
    batch = s.tokens.shape[0]
    h = F.embedding(s.tokens, w.embed)
    attend = _triton_attend(w, s, cos, sin, attention or attention_config(batch)) if use_triton else \
        _torch_attend(w, s, cos, sin, kv_len)
    fused = batch >= FUSED_MIN_ROWS
    beside = _side_stream(h) if fused and use_triton and MLP_BESIDE_ATTENTION else None
    pending = None
    for index, layer in enumerate(w.layers):
        x = _add_layer_norm(h, pending, layer.ln_w, layer.ln_b, w.eps, use_triton)
        if beside is not None:
            pending = _layer_mlp_beside(layer, x, lambda *args: attend(index, *args), beside)  # noqa: B023
        elif fused:
            pending = _fused_layer(layer, x, h, lambda *args: attend(index, *args))  # noqa: B023 - called now
        else:
            qkv = _linear(x, layer.qkv_w, layer.qkv_b, use_triton=use_triton)
            h = _mlp_and_residual(layer, x, attend(index, qkv, None), h, use_triton)
            pending = layer.out_b
    return _logits(w, h, pending, use_triton)


def _fused_layer(layer: PhiLayer, x: torch.Tensor, h: torch.Tensor, attend) -> torch.Tensor:
    """[attention | gelu(fc1(x))] @ [dense | fc2].T + biases: two matrix products per layer, not four.

    q, k, v and fc1 all read x, so one product makes them; attention and the GELU write their outputs
    side by side, so dense and fc2 become one product too. Wider products keep more of the GPU busy
    at batch sizes past the skinny kernel's (dense alone has only 2,560 output columns). Returns the
    layer's output, which the next layer norm adds to h: a product with a bias vector takes cuBLASLt's
    fused-bias path, measured faster here than accumulating into h in place.
    """
    hidden = layer.hidden
    y = torch.addmm(layer.in_b, x, layer.in_w.t())
    mixed = torch.empty((x.shape[0], layer.out_w.shape[1]), dtype=x.dtype, device=x.device)
    attend(y[:, :3 * hidden], mixed[:, :hidden], (y[:, 3 * hidden:], mixed[:, hidden:]))
    return torch.addmm(layer.out_b, mixed, layer.out_w.t())


def _fc1_gelu(layer: PhiLayer, x: torch.Tensor) -> torch.Tensor:
    """gelu_new(fc1(x)). On CUDA cuBLASLt applies the GELU (tanh form) to the product's fp32 sums as
    it writes them; torch's CPU version of that op applies the erf GELU instead, so the CPU takes
    two ops."""
    if x.is_cuda:
        return torch._addmm_activation(layer.fc1_b, x, layer.fc1_w.t(), use_gelu=True)
    return F.gelu(torch.addmm(layer.fc1_b, x, layer.fc1_w.t()), approximate="tanh")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(like: torch.Tensor) -> torch.cuda.Stream:
    if like.device not in _SIDE_STREAMS:
        _SIDE_STREAMS[like.device] = torch.cuda.Stream(like.device)
    return _SIDE_STREAMS[like.device]


def _layer_mlp_beside(layer: PhiLayer, x: torch.Tensor, attend,
                      side: torch.cuda.Stream) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output with the MLP on a second stream while attention reads the cache.

    phi-2's MLP reads the layer norm's output, not attention's, so fc1 (its GELU done by cuBLASLt
    on the fp32 sums) and fc2 need not wait for attention; the GPU fills the gaps of one with the
    other. Returns the pair (dense(attention), fc2(gelu(fc1(x)))), biases included, which the next
    layer norm adds to h (two products with a bias vector take cuBLASLt's fused-bias path; dense
    accumulating onto fc2's output would not). Memory is safe across the streams without
    record_stream: every tensor one stream reads from the other is made before a wait and freed
    after the join, which orders any reuse.
    """
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    attn = attend(torch.addmm(layer.qkv_b, x, layer.qkv_w.t()), None)
    with torch.cuda.stream(side):
        mlp = torch.addmm(layer.fc2_b, _fc1_gelu(layer, x), layer.fc2_w.t())
    main.wait_stream(side)
    return torch.addmm(layer.dense_b, attn, layer.dense_w.t()), mlp


def _triton_attend(w: PhiWeights, s: DecodeState, cos: torch.Tensor, sin: torch.Tensor,
                   config: AttentionConfig):
    def attend(index: int, qkv: torch.Tensor, out: torch.Tensor | None, gelu=None) -> torch.Tensor:
        if gelu is not None and not GELU_IN_ROPE:
            torch.ops.aten.gelu.out(gelu[0], approximate="tanh", out=gelu[1])
            gelu = None
        return triton_attention(qkv, s, s.k_cache[index], s.v_cache[index], cos, sin, w, config, out, gelu)

    return attend


def _torch_attend(w: PhiWeights, s: DecodeState, cos: torch.Tensor, sin: torch.Tensor, kv_len: int | None):
    """Rotary, cache write and SDPA under a mask over the first kv_len columns (the CPU's path)."""
    kv_len = s.k_cache.shape[3] if kv_len is None else kv_len
    key_cols = torch.arange(kv_len, device=s.tokens.device)
    mask = ((key_cols[None, :] >= s.starts[:, None]) & (key_cols[None, :] <= s.col))[:, None, None]
    cos_p, sin_p = cos[s.positions][:, None, None], sin[s.positions][:, None, None]
    batch = s.tokens.shape[0]

    def attend(index: int, qkv: torch.Tensor, out: torch.Tensor | None, gelu=None) -> torch.Tensor:
        """Attention of qkv's rows; with gelu=(src, dst), also dst = gelu_new(src)."""
        if gelu is not None:
            torch.ops.aten.gelu.out(gelu[0], approximate="tanh", out=gelu[1])
        k_cache, v_cache = s.k_cache[index], s.v_cache[index]
        q, k, v = qkv.view(batch, 3, w.heads, 1, w.head_dim).unbind(1)
        q = _rotate(q, cos_p, sin_p, w.rotary_dim)
        k_cache.index_copy_(2, s.col, _rotate(k, cos_p, sin_p, w.rotary_dim))
        v_cache.index_copy_(2, s.col, v)
        attn = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask)
        attn = attn.reshape(batch, -1)
        return attn if out is None else out.copy_(attn)

    return attend


# ----------------------------------------------------------------------------------------------
# Triton kernels for the decode step (CUDA only).

SKINNY_MAX_ROWS = 16  # skinny_linear's tile holds 16 rows (the smallest tensor-core tile)
SKINNY_BLOCK_N, SKINNY_BLOCK_K = 16, 128
FUSED_MIN_ROWS = SKINNY_MAX_ROWS + 1  # from here on: _layer_mlp_beside (Triton) or _fused_layer
GELU_IN_ROPE = True  # _fused_layer's GELU runs inside the rotary(+attention) kernel (False: a torch kernel)
NORM_WARPS = 16  # warps per row of the layer-norm kernel (decode_step_study.py --warps: 1% faster than 4 at batch 1)
ROPE_WARPS = 1  # warps per (token, head) of the rotary kernel (prefill of 128 x 32 tokens: 41.0 ms, 44.2 with 4)
MLP_BESIDE_ATTENTION = True  # batches on the fused path: the MLP on a second stream (_layer_mlp_beside)
PDL = True  # layer norm and attention start while the product before them drains (programmatic dependent launch)
ROPE_IN_ATTENTION = True  # the "dot" kernel (one split) also does the rotary and cache write: one launch


@dataclass(frozen=True)
class AttentionConfig:
    """How the decode attention kernel reads the cache.

    kernel: "dot" multiplies on tensor cores (the one query padded to 16 rows: arithmetic is free here,
    and the loads feeding tl.dot are pipelined through shared memory), "sum" on CUDA cores.
    split_dims: read an 80-wide head as 64 + 16 columns instead of one tile padded to 128.
    splits: programs per (row, head) along the sequence (flash-decoding), merged by a second kernel.
    """

    kernel: str = "sum"
    block_n: int = 32
    warps: int = 2
    stages: int = 1
    splits: int = 1
    split_dims: bool = True


# Per batch-size bucket (the smallest key >= the batch serves it): the fastest variants timed on an H100
# at phi-2's shape, cache 160 columns per row (benchmarks/llm_decode.py --tune-attention, then
# benchmarks/decode_step_study.py for the one-kernel form, 2026-11-25). Per layer, rotary and cache
# write included: batch 1 6.0 us, 8: 8.7, 32: 23.1, 128: 79.1 (2.65 TB/s). Many dot variants land
# within 2% of each other at batch 128; one split per (row, head) wins everywhere.
ATTENTION_CONFIGS: dict[int, AttentionConfig] = {
    1: AttentionConfig("dot", block_n=32, warps=2, stages=4, splits=1),
    8: AttentionConfig("dot", block_n=32, warps=2, stages=3, splits=1),
    32: AttentionConfig("dot", block_n=16, warps=1, stages=2, splits=1),
    128: AttentionConfig("dot", block_n=16, warps=1, stages=3, splits=1),
}


def attention_config(rows: int) -> AttentionConfig:
    for bucket in sorted(ATTENTION_CONFIGS):
        if rows <= bucket:
            return ATTENTION_CONFIGS[bucket]
    return ATTENTION_CONFIGS[max(ATTENTION_CONFIGS)]


def head_split(head_dim: int, split_dims: bool = True) -> tuple[int, int]:
    """(D0, D1): a head read as D0 + D1 columns, both powers of two, D1 >= 16 or 0.

    80 -> (64, 16). Where no such split exists (or split_dims is off), (next power of two, 0): one
    padded, masked tile.
    """
    padded = triton.next_power_of_2(head_dim) if triton is not None else 1 << (head_dim - 1).bit_length()
    if not split_dims or padded == head_dim:
        return padded, 0
    low = padded // 2
    rest = head_dim - low
    if rest >= 16 and rest & (rest - 1) == 0:
        return low, rest
    return padded, 0


def rope_and_cache_write(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, positions: torch.Tensor, col: torch.Tensor, tokens: int, w: PhiWeights,
                         gelu: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotary and cache write for `tokens` consecutive tokens per batch row (Triton).

    qkv [batch * tokens, >= 3 * hidden] (rows may be strided), positions [batch * tokens] (each
    token's rotary position); token t of row b goes to cache column col + t. Returns the rotated
    queries, [batch, heads, tokens, head_dim]. gelu=(src, dst): also dst = gelu_new(src), row by row.
    """
    heads, head_dim = w.heads, w.head_dim
    q = torch.empty((qkv.shape[0] // tokens, heads, tokens, head_dim), device=qkv.device, dtype=qkv.dtype)
    gelu_args, block_g = _gelu_share_args(gelu, qkv, heads)
    _rope_write_kernel[(qkv.shape[0], heads)](
        qkv, q, k_cache, v_cache, cos, sin, positions, col, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), tokens, *gelu_args, HEADS=heads, HEAD_DIM=head_dim, ROT=w.rotary_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_GELU=gelu is not None, BLOCK_G=block_g, num_warps=ROPE_WARPS,
    )
    return q


def _pdl() -> dict:
    """Launch options and the kernel flag for programmatic dependent launch, where Triton has it.

    The kernel's programs are then placed on the GPU while the previous kernel (a cuBLAS product)
    finishes, and wait for its results inside (_wait_for_inputs), instead of being launched after it.
    """
    on = PDL and HAS_GRID_WAIT
    return {"launch_pdl": True, "PDL": True} if on else {"PDL": False}


def _gelu_share_args(gelu: tuple[torch.Tensor, torch.Tensor] | None, qkv: torch.Tensor, heads: int):
    """The kernels' GELU arguments (src, dst, their row strides, width, columns per head program) and the
    block that holds one program's share; with no GELU asked for, placeholders the kernel never reads."""
    src, dst = gelu if gelu is not None else (qkv, qkv)
    per_head = -(-src.shape[1] // heads) if gelu is not None else 1
    args = (src, dst, src.stride(0), dst.stride(0), src.shape[1] if gelu is not None else 0, per_head)
    return args, triton.next_power_of_2(per_head)


def triton_attention(qkv: torch.Tensor, s: DecodeState, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, w: PhiWeights, config: AttentionConfig,
                     out: torch.Tensor | None = None,
                     gelu: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotary + cache write, then attention of each row's query over its valid cache columns.

    Writes [batch, heads * head_dim] into `out` (rows may be strided, e.g. a block of columns of a
    wider tensor) or a new tensor. gelu=(src, dst): also dst = gelu_new(src) (the MLP's activation,
    [batch, inner], rows may be strided), done by the rotary kernel to save a launch per layer.
    """
    batch, heads, head_dim = qkv.shape[0], w.heads, w.head_dim
    block_d = triton.next_power_of_2(head_dim)
    gelu_args, block_g = _gelu_share_args(gelu, qkv, heads)
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    # fp32 caches (the tiny test models) keep full precision in tl.dot: no tf32
    precision = "ieee" if k_cache.dtype == torch.float32 else None
    splits = config.splits
    d0, d1 = head_split(head_dim, config.split_dims)
    if out is None:
        out = torch.empty((batch, heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    if config.kernel == "dot" and splits == 1 and ROPE_IN_ATTENTION:
        _rope_attn_kernel[(batch * heads,)](
            qkv, k_cache, v_cache, cos, sin, s.positions, s.starts, s.col, out, qkv.stride(0), *cache_strides,
            1.0 / math.sqrt(head_dim), out.stride(0), *gelu_args, HEADS=heads, HEAD_DIM=head_dim,
            ROT=w.rotary_dim, BLOCK_N=config.block_n, D0=d0, D1=max(d1, 16), HAS_TAIL=d1 > 0,
            STAGES=config.stages, PRECISION=precision, HAS_GELU=gelu is not None,
            BLOCK_G=block_g, num_warps=config.warps, num_stages=max(config.stages, 1), **_pdl())
        return out
    q = rope_and_cache_write(qkv, k_cache, v_cache, cos, sin, s.positions, s.col, 1, w, gelu)
    partial = torch.empty((batch * heads, splits, head_dim), device=qkv.device, dtype=torch.float32)
    m = torch.empty((batch * heads, splits), device=qkv.device, dtype=torch.float32)
    l = torch.empty_like(m)
    kernel = _attn_dot_kernel if config.kernel == "dot" else _attn_sum_kernel
    kernel[(batch * heads, splits)](
        q, k_cache, v_cache, s.starts, s.col, partial, m, l, out,
        *cache_strides, 1.0 / math.sqrt(head_dim), splits,
        out.stride(0), HEADS=heads, HEAD_DIM=head_dim, DIRECT=splits == 1, BLOCK_N=config.block_n, D0=d0,
        D1=max(d1, 16), HAS_TAIL=d1 > 0, STAGES=config.stages, num_warps=config.warps, PRECISION=precision,
        num_stages=max(config.stages, 1),
    )
    if splits == 1:  # the split kernel wrote the output itself
        return out
    _attn_merge_kernel[(batch * heads,)](partial, m, l, out, out.stride(0), HEADS=heads, HEAD_DIM=head_dim,
                                         SPLITS=splits,
                                         BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=1)
    return out


# Triton's interpreter (TRITON_INTERPRET=1, the tests' way to run kernels on the CPU) cannot run the
# wait's inline PTX.
HAS_GRID_WAIT = (triton is not None and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
                 and os.environ.get("TRITON_INTERPRET") != "1")

if triton is not None:
    from pipeline.kernels.norm import layer_norm_row

    if HAS_GRID_WAIT:
        @triton.jit
        def _wait_for_inputs():
            """Block until the kernel launched before this one has finished and its writes are visible."""
            tl.extra.cuda.gdc_wait()
    else:  # pragma: no cover - Triton before 3.4, or its interpreter; _pdl() never asks for the wait then
        @triton.jit
        def _wait_for_inputs():
            pass

    @triton.jit
    def _rope_write_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, col_ptr,
                           stride_qkv, stride_cb, stride_ch, stride_cs, tokens,
                           g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head,
                           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
                           BLOCK_D: tl.constexpr, HAS_GELU: tl.constexpr, BLOCK_G: tl.constexpr):
        """One head of one token: rotary on q (to q, [batch, heads, tokens, head_dim]) and k, k and v
        into cache column col + (the token's place in its row), optionally the MLP's GELU share."""
        r = tl.program_id(0)  # qkv row: token r % tokens of batch row r // tokens
        h = tl.program_id(1)
        b = r // tokens
        t = r % tokens
        if HAS_GELU:
            _gelu_share(g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, r, h, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        valid = d < HEAD_DIM
        pos = tl.load(pos_ptr + r)
        base = qkv_ptr + r * stride_qkv + h * HEAD_DIM
        q = _rotated(base, d, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM)
        k = _rotated(base + HEADS * HEAD_DIM, d, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM)
        v = tl.load(base + 2 * HEADS * HEAD_DIM + d, mask=valid, other=0.0)
        tl.store(q_ptr + ((b * HEADS + h) * tokens + t) * HEAD_DIM + d, q.to(q_ptr.dtype.element_ty), mask=valid)
        col = tl.load(col_ptr) + t
        dst = b * stride_cb + h * stride_ch + col * stride_cs + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=valid)
        tl.store(v_cache_ptr + dst, v, mask=valid)

    @triton.jit
    def _gelu_share(g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, b, h,
                    BLOCK_G: tl.constexpr):
        """Program (b, h)'s share of row b's MLP activation: gelu_new, tanh via exp."""
        g = h * per_head + tl.arange(0, BLOCK_G)
        in_row = (g < (h + 1) * per_head) & (g < inner)
        x = tl.load(g_src_ptr + b * stride_g_src + g, mask=in_row, other=0.0).to(tl.float32)
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
        tl.store(g_dst_ptr + b * stride_g_dst + g, y.to(g_dst_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _rotated(base, d, cos_ptr, sin_ptr, pos, ROT: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Features d of the head at `base` after phi's partial rotary embedding, in fp32 (0 past the head).

        rotate_half: feature i < ROT/2 pairs with i + ROT/2 (negated), i in [ROT/2, ROT) with i - ROT/2;
        features from ROT on pass through (cos 1, sin 0).
        """
        half: tl.constexpr = ROT // 2
        valid = d < HEAD_DIM
        rotated = d < ROT
        partner = tl.where(d < half, d + half, tl.where(rotated, d - half, d))
        cos = tl.load(cos_ptr + pos * ROT + d, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * ROT + d, mask=rotated, other=0.0).to(tl.float32)
        sin = tl.where(d < half, -sin, sin)
        x = tl.load(base + d, mask=valid, other=0.0).to(tl.float32)
        x_p = tl.load(base + partner, mask=valid, other=0.0).to(tl.float32)
        return x * cos + x_p * sin

    @triton.jit
    def _split_columns(starts_ptr, col_ptr, b, split, n_splits, BLOCK_N: tl.constexpr):
        """Cache columns [lo, hi) of row b that split `split` of n_splits reads (whole tiles each)."""
        start = tl.load(starts_ptr + b)
        end = tl.load(col_ptr) + 1
        chunk = tl.cdiv(tl.cdiv(end - start, n_splits), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        return lo, tl.minimum(lo + chunk, end)

    @triton.jit
    def _attn_sum_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, col_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
                         stride_cb, stride_ch, stride_cs, scale, n_splits, stride_out,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
                         BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr,
                         STAGES: tl.constexpr, PRECISION: tl.constexpr):
        """Attention of one query over its columns on CUDA cores; head read as D0 (+ D1) columns."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HEADS
        h = bh % HEADS
        lo, hi = _split_columns(starts_ptr, col_ptr, b, split, n_splits, BLOCK_N)
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        valid0 = d0 < HEAD_DIM  # all true unless the head is one padded tile
        q0 = tl.load(q_ptr + bh * HEAD_DIM + d0, mask=valid0, other=0.0).to(tl.float32) * scale
        q1 = tl.load(q_ptr + bh * HEAD_DIM + d1, mask=HAS_TAIL & (d1 < HEAD_DIM), other=0.0).to(tl.float32) * scale
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc0 = tl.zeros([D0], dtype=tl.float32)
        acc1 = tl.zeros([D1], dtype=tl.float32)
        base = b * stride_cb + h * stride_ch
        for n0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = n < hi
            offs = base + n[:, None] * stride_cs
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
    def _attn_dot_loop(q0, q1, k_ptr, v_ptr, base, stride_cs, lo, hi, scale, HEAD_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr,
                       STAGES: tl.constexpr, PRECISION: tl.constexpr):
        """Online softmax of the query (q0 | q1, in the cache's dtype) over cache columns lo..hi-1 on
        tensor cores: the query is row 0 of a 16-row tile (rows 1-15 zero).

        Returns (acc0, acc1, m, l): the unnormalised output, the running max and the sum of weights.
        The loads feeding tl.dot are what Triton pipelines (cp.async into shared memory, STAGES
        deep), which keeps more of the cache in flight than plain register loads.
        """
        dtype = k_ptr.dtype.element_ty
        r = tl.arange(0, 16)
        first = r[:, None] == 0
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        valid0 = d0 < HEAD_DIM
        q0 = tl.where(first, q0[None, :], 0.0).to(dtype)
        q1 = tl.where(first, q1[None, :], 0.0).to(dtype)
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], dtype=tl.float32)
        acc0 = tl.zeros([16, D0], dtype=tl.float32)
        acc1 = tl.zeros([16, D1], dtype=tl.float32)
        for n0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = n < hi
            offs = base + n[:, None] * stride_cs
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
        # row 0 holds the query's results
        out0 = tl.sum(tl.where(first, acc0, 0.0), axis=0)
        out1 = tl.sum(tl.where(first, acc1, 0.0), axis=0)
        m_0 = tl.max(tl.where(r == 0, m_i, float("-inf")), axis=0)
        l_0 = tl.sum(tl.where(r == 0, l_i, 0.0), axis=0)
        return out0, out1, m_0, l_0

    @triton.jit
    def _attn_dot_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, col_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
                         stride_cb, stride_ch, stride_cs, scale, n_splits, stride_out,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
                         BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr,
                         STAGES: tl.constexpr, PRECISION: tl.constexpr):
        """As _attn_sum_kernel on tensor cores (_attn_dot_loop)."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HEADS
        h = bh % HEADS
        lo, hi = _split_columns(starts_ptr, col_ptr, b, split, n_splits, BLOCK_N)
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        q0 = tl.load(q_ptr + bh * HEAD_DIM + d0, mask=d0 < HEAD_DIM, other=0.0)
        q1 = tl.load(q_ptr + bh * HEAD_DIM + d1, mask=HAS_TAIL & (d1 < HEAD_DIM), other=0.0)
        out0, out1, m_0, l_0 = _attn_dot_loop(q0, q1, k_ptr, v_ptr, b * stride_cb + h * stride_ch, stride_cs,
                                              lo, hi, scale, HEAD_DIM, BLOCK_N, D0, D1, HAS_TAIL, STAGES,
                                              PRECISION)
        _attn_store(out0, out1, m_0, l_0, d0, d1, bh, b * stride_out + h * HEAD_DIM, split, n_splits, o_ptr,
                    m_ptr, l_ptr, out_ptr, HEAD_DIM, DIRECT, HAS_TAIL)

    @triton.jit
    def _rope_attn_kernel(qkv_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, starts_ptr, col_ptr, out_ptr,
                          stride_qkv, stride_cb, stride_ch, stride_cs, scale, stride_out,
                          g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head,
                          HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_N: tl.constexpr,
                          D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, STAGES: tl.constexpr,
                          PRECISION: tl.constexpr, HAS_GELU: tl.constexpr, BLOCK_G: tl.constexpr,
                          PDL: tl.constexpr):
        """_rope_write_kernel and _attn_dot_kernel (one split) as one kernel: one launch per layer.

        The step's own key and value go to the cache for later steps, but this step takes them from
        registers: the loop reads the columns before `col`, and the new column joins the softmax last.
        """
        if PDL:
            _wait_for_inputs()
        bh = tl.program_id(0)
        b = bh // HEADS
        h = bh % HEADS
        if HAS_GELU:
            _gelu_share(g_src_ptr, g_dst_ptr, stride_g_src, stride_g_dst, inner, per_head, b, h, BLOCK_G)
        dtype = k_ptr.dtype.element_ty
        pos = tl.load(pos_ptr + b)
        col = tl.load(col_ptr)
        d0 = tl.arange(0, D0)
        d1 = D0 + tl.arange(0, D1)
        valid0 = d0 < HEAD_DIM
        valid1 = HAS_TAIL & (d1 < HEAD_DIM)
        row = qkv_ptr + b * stride_qkv + h * HEAD_DIM
        # rounded to the cache's dtype, as the two-kernel path stores and reads them back
        q0 = _rotated(row, d0, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        q1 = _rotated(row, d1, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        k0 = _rotated(row + HEADS * HEAD_DIM, d0, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        k1 = _rotated(row + HEADS * HEAD_DIM, d1, cos_ptr, sin_ptr, pos, ROT, HEAD_DIM).to(dtype)
        v0 = tl.load(row + 2 * HEADS * HEAD_DIM + d0, mask=valid0, other=0.0).to(dtype)
        v1 = tl.load(row + 2 * HEADS * HEAD_DIM + d1, mask=valid1, other=0.0).to(dtype)
        base = b * stride_cb + h * stride_ch
        cell = base + col * stride_cs
        tl.store(k_ptr + cell + d0, k0, mask=valid0)
        tl.store(v_ptr + cell + d0, v0, mask=valid0)
        tl.store(k_ptr + cell + d1, k1, mask=valid1)
        tl.store(v_ptr + cell + d1, v1, mask=valid1)
        acc0, acc1, m_i, l_i = _attn_dot_loop(q0, q1, k_ptr, v_ptr, base, stride_cs, tl.load(starts_ptr + b), col,
                                              scale, HEAD_DIM, BLOCK_N, D0, D1, HAS_TAIL, STAGES, PRECISION)
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

    @triton.jit
    def _add_layer_norm_kernel(h_ptr, a_ptr, b2_ptr, w_ptr, b_ptr, x_ptr, N, stride, a_stride, b2_stride, eps,
                               ADDS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One row: h += a (+ b2) (summed in fp32, stored back rounded once), x = layer_norm(h).

        A stride of 0: one vector for every row (biases); else a tensor of rows (a layer's output)."""
        if PDL:
            _wait_for_inputs()
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
