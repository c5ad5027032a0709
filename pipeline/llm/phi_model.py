"""phi-2's forward pass written for generation: a prefill over padded prompts and a one-token decode step.

Only the model math lives here; the loop is `fast_batch.py`'s, the cache and the step's inputs
`answer_cache.py`'s, sampling `sampler.py`'s, the weights' layout `phi_weights.py`'s, the Triton
kernels are in `pipeline/kernels/`. Both functions take a `DecodeConfig` (decode_config.py) that says
which paths and kernels to use. The prefill writes a group's keys and values into a scratch cache
[layers, batch, heads, width, head_dim] (the batch copies them into its blocks); the decode step
reads and writes the paged cache [layers, blocks, heads, block_size, head_dim] through each row's
block table (llm/blocks.py).

Row b's valid keys are its columns start[b]..col[b]; each row has its own length (col has one element
per row). The decode step reads its inputs from tensors only (no Python numbers that change between
steps), so one CUDA graph per batch size can replay it for every token, whatever mix of lengths its
rows have.

With Triton (use_triton), one kernel per layer replaces the rotary, cache-write and attention ops and
reads only each row's valid cache columns, where scaled_dot_product_attention would read the whole
cache under a mask. From `config.fused_min_rows` rows on, the MLP runs on a second stream beside
attention (`_layer_mlp_beside`) or, without Triton, a layer is two matrix products, [q k v fc1] and
[dense fc2], over weights stacked in place (`_fused_layer`). Either way the layer's outputs are
added to the residual stream by the next layer's norm.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.kernels.attention_tiles import AttentionConfig
from pipeline.kernels.linear import skinny_fits, skinny_linear
from pipeline.kernels.norm import add_layer_norm
from pipeline.kernels.phi_attention import triton_attention
from pipeline.kernels.phi_rope import rope_and_cache_write
from pipeline.llm.decode_config import DEFAULT_DECODE, DecodeConfig
from pipeline.llm.multi_lora import LayerLora, selection
from pipeline.llm.phi_weights import PhiLayer, PhiWeights


SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def unsupported_config(config, kind: str | None = None) -> str | None:
    """None when these functions implement a checkpoint of this config (the fast engine's rule),
    else why not; `kind` names a model without a config."""
    kind = getattr(config, "model_type", kind)
    if kind != "phi":
        return f"the fast engine serves phi-2-family causal LMs, not '{kind}'"
    if getattr(config, "qk_layernorm", False):
        return "the fast engine does not implement phi's qk_layernorm variant"
    if config.num_key_value_heads not in (None, config.num_attention_heads):
        return "the fast engine does not implement grouped-query attention"
    # transformers 5 names it rope_parameters (rope_scaling is an alias), 4.x rope_scaling
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return "the fast engine implements only phi-2's default rotary embedding"
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        return f"the fast engine does not implement the activation '{config.hidden_act}'"
    return None


@dataclass
class DecodeState:
    """The tensors one decode step reads; fixed addresses, so a captured graph can replay the step."""

    tokens: torch.Tensor  # [B] long: the token to feed
    positions: torch.Tensor  # [B] long: its rotary position (col - start)
    col: torch.Tensor  # [1] or [B] long: the column it is written to (shared, or each row's)
    starts: torch.Tensor  # [B] long: first valid column of each row
    k_cache: torch.Tensor  # [layers, blocks, heads, block_size, head_dim]
    v_cache: torch.Tensor
    table: torch.Tensor  # [B, blocks per row] long: row b's column c is in block table[b, c // block_size]
    block_size: int
    adapters: torch.Tensor | None = None  # [B] long: each row's LoRA adapter (0: the base; multi_lora.py)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding on the first rotary_dim features of each head (phi's partial rotary)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def fp32_scores(device: torch.device | str):
    """A context in which CUDA's SDPA sums attention scores in fp32: its flash and memory-efficient
    kernels do (the math kernel multiplies in the inputs' dtype, where phi-2 overflows in float16)."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
          fp32: bool) -> torch.Tensor:
    """scaled_dot_product_attention; with fp32, its scores in fp32 whatever the inputs' dtype. float16
    inputs always get fp32 scores, whatever the config says: phi-2's scores overflow float16."""
    fp32 = fp32 or q.dtype == torch.float16
    if not fp32 or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if q.is_cuda:
        with fp32_scores(q.device):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          is_causal=is_causal).to(q.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, gelu: bool = False,
            use_triton: bool = False) -> torch.Tensor:
    """[gelu_new](x @ weight.T + bias) for 2-D x."""
    if use_triton and skinny_fits(x, weight):
        return skinny_linear(x, weight, bias, gelu=gelu)
    out = torch.addmm(bias, x, weight.t())
    return F.gelu(out, approximate="tanh") if gelu else out


def _mlp_and_residual(layer: PhiLayer, x: torch.Tensor, attn: torch.Tensor, h: torch.Tensor,
                      use_triton: bool = False, lora: LayerLora | None = None) -> torch.Tensor:
    """h += dense(attn) + fc2(gelu_new(fc1(x))), in place, without the two biases.

    phi's block is parallel: both branches land on the residual stream, so the GEMMs accumulate into
    h directly (in place, so cuBLAS does not first copy h). The biases (summed in out_b) are added by
    the next layer norm (`_add_layer_norm`), which saves a kernel per layer.
    """
    width = h.shape[-1]
    h2, x2, attn2 = h.view(-1, width), x.view(-1, width), attn.reshape(-1, attn.shape[-1])
    h2.addmm_(attn2, layer.dense_w.t())
    if lora is None:
        up = _linear(x2, layer.fc1_w, layer.fc1_b, gelu=True, use_triton=use_triton)
    else:  # the row's fc1 update goes in before the GELU
        lora.add("dense", attn2, h2)
        up = F.gelu(lora.add("fc1", x2, _linear(x2, layer.fc1_w, layer.fc1_b, use_triton=use_triton)),
                    approximate="tanh")
    h2.addmm_(up, layer.fc2_w.t())
    if lora is not None:
        lora.add("fc2", up, h2)
    return h


def _add_layer_norm(h: torch.Tensor, pending, weight: torch.Tensor, shift: torch.Tensor, eps: float,
                    use_triton: bool, config: DecodeConfig) -> torch.Tensor:
    """h += pending (in place), then return layer_norm(h).

    pending is what the previous layer has not yet added to the residual stream: None, its biases
    (a vector), its output (a tensor shaped like h), or its two branches' outputs (a pair, summed in
    fp32 before the one rounding to h's dtype).
    """
    adds = pending if isinstance(pending, tuple) else (pending,) if pending is not None else ()
    if use_triton and h.dim() == 2:
        return add_layer_norm(h, adds, weight, shift, eps, warps=config.norm_warps, pdl=config.pdl)
    if len(adds) == 2:
        h.add_(adds[0].float() + adds[1])
    elif adds:
        h.add_(adds[0])
    return F.layer_norm(h, h.shape[-1:], weight, shift, eps)


def _logits(w: PhiWeights, h: torch.Tensor, pending, use_triton: bool, config: DecodeConfig) -> torch.Tensor:
    x = _add_layer_norm(h, pending, w.final_ln_w, w.final_ln_b, w.eps, use_triton, config)
    return torch.addmm(w.lm_b, x, w.lm_w.t())


def prefill(w: PhiWeights, ids: torch.Tensor, starts: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor, use_triton: bool = False,
            config: DecodeConfig = DEFAULT_DECODE, adapters: torch.Tensor | None = None,
            keep: Callable[[int], None] = lambda layer: None) -> torch.Tensor:
    """Run left-padded prompts ids [B, P], return the last column's logits.

    starts[b] is the first real column of row b. k_cache/v_cache are one layer's scratch, [B, heads,
    >= P, head_dim]: each layer writes its keys and values to columns 0..P-1 there, then `keep(layer)`
    copies them where they belong (the answer cache's blocks), so the scratch holds one layer, not 32.
    With use_triton, one kernel per layer does the rotary and the cache write (rope_and_cache_write),
    where torch takes a dozen elementwise kernels and copies. The two branches' outputs reach the
    residual stream through the next layer norm, as in the decode step. adapters[b]: row b's LoRA
    adapter (multi_lora.py; None or no adapter loaded: none).
    """
    batch, width = ids.shape
    cols = torch.arange(width, device=ids.device)
    positions = (cols[None, :] - starts[:, None]).clamp_(min=0)
    if use_triton:
        first_col = torch.zeros(1, dtype=torch.long, device=ids.device)  # token t of every row -> column t
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
    rows_lora = selection(w.lora, adapters, width)
    for index, layer in enumerate(w.layers):
        lora = rows_lora.layer(index) if rows_lora is not None else None
        x = _add_layer_norm(h, pending, layer.ln_w, layer.ln_b, w.eps, use_triton, config)
        qkv = torch.addmm(layer.qkv_b, x, layer.qkv_w.t())
        if lora is not None:
            lora.add("qkv", x, qkv)
        if use_triton:
            q = rope_and_cache_write(qkv, k_cache, v_cache, cos, sin, positions.view(-1), first_col,
                                     width, w, warps=config.rope_warps)
            k, v = k_cache[:, :, :width], v_cache[:, :, :width]
        else:
            q, k, v = qkv.view(batch, width, 3, w.heads, w.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = _rotate(q, cos_p, sin_p, w.rotary_dim)  # each [B, heads, P, head_dim]
            k = _rotate(k, cos_p, sin_p, w.rotary_dim)
            k_cache[:, :, :width] = k
            v_cache[:, :, :width] = v
        keep(index)
        attn = _sdpa(q, k, v, mask, not padded, config.fp32_attention_scores)
        attn = attn.transpose(1, 2).reshape(tokens, hidden)
        up = _fc1_gelu(layer, x, lora)
        pending = (torch.addmm(layer.dense_b, attn, layer.dense_w.t()), torch.addmm(layer.fc2_b, up, layer.fc2_w.t()))
        if lora is not None:
            lora.add("dense", attn, pending[0])
            lora.add("fc2", up, pending[1])
    last = slice(width - 1, None, width)  # each row's last column
    return _logits(w, h[last].contiguous(), tuple(p[last] for p in pending), use_triton, config)


def decode_step(w: PhiWeights, s: DecodeState, cos: torch.Tensor, sin: torch.Tensor, *, use_triton: bool,
                kv_len: int | None = None, attention: AttentionConfig | None = None,
                config: DecodeConfig = DEFAULT_DECODE) -> torch.Tensor:
    """One token for every row: write its key/value at column col, return logits [B, vocab].

    kv_len bounds the columns the torch attention path gathers from the blocks (the longest row's
    col + 1 in eager mode; in a graph, what the graph was captured for). The Triton path reads exactly
    start..col and ignores it; `attention` picks its kernel and tiles (default: the config's for this
    batch size).
    """
    batch = s.tokens.shape[0]
    h = F.embedding(s.tokens, w.embed)
    if use_triton:
        attend = _triton_attend(w, s, cos, sin, attention or config.attention(batch), config)
    else:
        attend = _torch_attend(w, s, cos, sin, kv_len, config.fp32_attention_scores)
    rows_lora = selection(w.lora, s.adapters)  # each row's adapter (multi_lora.py), or None: no LoRA work
    fused = batch >= config.fused_min_rows or (rows_lora is not None and config.lora_fused_layer)
    beside_ok = config.mlp_beside_attention and (rows_lora is None or config.lora_mlp_beside)
    beside = _side_stream(h) if fused and use_triton and beside_ok else None
    pending = None
    for index, layer in enumerate(w.layers):
        lora = rows_lora.layer(index) if rows_lora is not None else None
        x = _add_layer_norm(h, pending, layer.ln_w, layer.ln_b, w.eps, use_triton, config)
        if beside is not None:
            pending = _layer_mlp_beside(layer, x, lambda *args: attend(index, *args), beside, lora)  # noqa: B023
        elif fused:
            pending = _fused_layer(layer, x, lambda *args: attend(index, *args), lora)  # noqa: B023 - called now
        else:
            qkv = _linear(x, layer.qkv_w, layer.qkv_b, use_triton=use_triton)
            if lora is not None:
                lora.add("qkv", x, qkv)
            h = _mlp_and_residual(layer, x, attend(index, qkv, None), h, use_triton, lora)
            pending = layer.out_b
    return _logits(w, h, pending, use_triton, config)


def _fused_layer(layer: PhiLayer, x: torch.Tensor, attend, lora: LayerLora | None = None) -> torch.Tensor:
    """[attention | gelu(fc1(x))] @ [dense | fc2].T + biases: two matrix products per layer, not four.

    q, k, v and fc1 all read x, so one product makes them; attention and the GELU write their outputs
    side by side, so dense and fc2 become one product too. Wider products keep more of the GPU busy
    at batch sizes past the skinny kernel's (dense alone has only 2,560 output columns). Returns the
    layer's output, which the next layer norm adds to h: a product with a bias vector takes cuBLASLt's
    fused-bias path, measured faster here than accumulating into h in place.
    """
    hidden = layer.hidden
    # each row's update of q, k, v and fc1 (before the GELU), then of dense and fc2: one masked pair
    # of products each, its first half beside the base product (multi_lora.py)
    started = lora.begin("in", x) if lora is not None else None
    y = torch.addmm(layer.in_b, x, layer.in_w.t())
    if started is not None:
        lora.finish(started, y)
    mixed = torch.empty((x.shape[0], layer.out_w.shape[1]), dtype=x.dtype, device=x.device)
    attend(y[:, :3 * hidden], mixed[:, :hidden], (y[:, 3 * hidden:], mixed[:, hidden:]))
    started = lora.begin("out", mixed) if lora is not None else None
    out = torch.addmm(layer.out_b, mixed, layer.out_w.t())
    return out if started is None else lora.finish(started, out)


def _fc1_gelu(layer: PhiLayer, x: torch.Tensor, lora: LayerLora | None = None) -> torch.Tensor:
    """gelu_new(fc1(x)) (with `lora`, each row's fc1 update added before the GELU). On CUDA cuBLASLt
    applies the GELU (tanh form) to the product's fp32 sums as it writes them; torch's CPU version of
    that op applies the erf GELU instead, so the CPU takes two ops."""
    if lora is not None:
        return F.gelu(lora.add("fc1", x, torch.addmm(layer.fc1_b, x, layer.fc1_w.t())), approximate="tanh")
    if x.is_cuda:
        return torch._addmm_activation(layer.fc1_b, x, layer.fc1_w.t(), use_gelu=True)
    return F.gelu(torch.addmm(layer.fc1_b, x, layer.fc1_w.t()), approximate="tanh")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(like: torch.Tensor) -> torch.cuda.Stream:
    if like.device not in _SIDE_STREAMS:
        _SIDE_STREAMS[like.device] = torch.cuda.Stream(like.device)
    return _SIDE_STREAMS[like.device]


def _layer_mlp_beside(layer: PhiLayer, x: torch.Tensor, attend, side: torch.cuda.Stream,
                      lora: LayerLora | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    qkv = torch.addmm(layer.qkv_b, x, layer.qkv_w.t())
    attn = attend(qkv if lora is None else lora.add("qkv", x, qkv), None)
    with torch.cuda.stream(side):
        up = _fc1_gelu(layer, x, lora)
        mlp = torch.addmm(layer.fc2_b, up, layer.fc2_w.t())
        if lora is not None:
            lora.add("fc2", up, mlp)
    main.wait_stream(side)
    dense = torch.addmm(layer.dense_b, attn, layer.dense_w.t())
    return (dense if lora is None else lora.add("dense", attn, dense)), mlp


def _triton_attend(w: PhiWeights, s: DecodeState, cos: torch.Tensor, sin: torch.Tensor,
                   attention: AttentionConfig, config: DecodeConfig):
    def attend(index: int, qkv: torch.Tensor, out: torch.Tensor | None, gelu=None) -> torch.Tensor:
        if gelu is not None and not config.gelu_in_rope:
            torch.ops.aten.gelu.out(gelu[0], approximate="tanh", out=gelu[1])
            gelu = None
        return triton_attention(qkv, s, s.k_cache[index], s.v_cache[index], cos, sin, w, attention, out, gelu,
                                rope_inside=config.rope_in_attention, rope_warps=config.rope_warps,
                                pdl=config.pdl)

    return attend


def _torch_attend(w: PhiWeights, s: DecodeState, cos: torch.Tensor, sin: torch.Tensor, kv_len: int | None,
                  fp32: bool = False):
    """Rotary, cache write and SDPA under a mask over each row's first kv_len columns, gathered from
    its blocks (the CPU's path, and GPUs without the Triton kernels)."""
    size = s.block_size
    blocks = s.table.shape[1] if kv_len is None else -(-kv_len // size)
    key_cols = torch.arange(blocks * size, device=s.tokens.device)
    mask = ((key_cols[None, :] >= s.starts[:, None]) & (key_cols[None, :] <= s.col[:, None]))[:, None, None]
    cos_p, sin_p = cos[s.positions][:, None, None], sin[s.positions][:, None, None]
    batch = s.tokens.shape[0]
    col = s.col.expand(batch)
    rows = torch.arange(batch, device=s.tokens.device)
    where = s.table[rows, col // size], col % size  # each row's block and offset for this step's column

    def gathered(cache: torch.Tensor) -> torch.Tensor:
        """[B, heads, blocks * size, head_dim]: each row's columns, from its blocks in order."""
        rows_blocks = cache[s.table[:, :blocks]]  # [B, blocks, heads, size, head_dim]
        return rows_blocks.transpose(1, 2).reshape(batch, w.heads, blocks * size, w.head_dim)

    def attend(index: int, qkv: torch.Tensor, out: torch.Tensor | None, gelu=None) -> torch.Tensor:
        """Attention of qkv's rows; with gelu=(src, dst), also dst = gelu_new(src)."""
        if gelu is not None:
            torch.ops.aten.gelu.out(gelu[0], approximate="tanh", out=gelu[1])
        k_cache, v_cache = s.k_cache[index], s.v_cache[index]
        q, k, v = qkv.view(batch, 3, w.heads, 1, w.head_dim).unbind(1)
        q = _rotate(q, cos_p, sin_p, w.rotary_dim)
        k_cache[where[0], :, where[1]] = _rotate(k, cos_p, sin_p, w.rotary_dim)[:, :, 0]
        v_cache[where[0], :, where[1]] = v[:, :, 0]
        attn = _sdpa(q, gathered(k_cache), gathered(v_cache), mask, False, fp32)
        attn = attn.reshape(batch, -1)
        return attn if out is None else out.copy_(attn)

    return attend
