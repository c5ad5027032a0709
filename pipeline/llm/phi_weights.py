"""phi-2's weights in the layout the fast engine's step functions read, and its rotary tables.

`phi_weights` stacks each layer's projections that read the same input ([q k v fc1]) or add to the same
output ([dense fc2]) into one tensor and points the transformers model's modules at views of it: one
matrix product instead of several at every step, without a second copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    lora: object | None = None  # multi_lora.MultiLora: the LoRA adapters rows may apply (FastPhiEngine.add_adapter)

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
