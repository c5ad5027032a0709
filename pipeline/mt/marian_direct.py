"""A MarianMT checkpoint for the fast backend alone: plain torch modules named as MarianMTModel's.

The fast backend (fast_marian.py) reads the layers' modules and never runs transformers' model, so
where it will serve (CUDA) the checkpoint is read straight into this tree (pipeline/weights.py): no
transformers model class is imported, and the sinusoidal position tables, which no checkpoint
stores, are computed at once instead of in transformers' Python loop (0.4 s a table at the
published shape). Only what the fast backend implements loads this way (`lean_reason`); any other
Marian checkpoint loads as a MarianMTModel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quiet import status
from pipeline.weights import DirectModel, Embedding, LayerNorm, Linear, fill, generation_config_of, read_weights

ACTIVATIONS = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}  # transformers' ACT2FN of these


def sinusoidal_table(positions: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Marian's position table as transformers computes it (float64, sines then cosines, not
    interleaved, through float32): each frequency's divisor is numpy's scalar power, as there."""
    divisors = np.array([np.power(10000, 2 * (j // 2) / dim) for j in range(dim)])
    angles = np.arange(positions, dtype=np.float64)[:, None] / divisors[None, :]
    split = (dim + 1) // 2
    table = torch.empty(positions, dim, dtype=dtype)
    table[:, :split] = torch.from_numpy(np.sin(angles[:, 0::2])).float()
    table[:, split:] = torch.from_numpy(np.cos(angles[:, 1::2])).float()
    return table


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (Linear(width, width) for _ in range(4))


class _Layer(nn.Module):
    def __init__(self, config, ffn: int, decoder: bool):
        super().__init__()
        width = config.d_model
        self.self_attn = _Attention(width)
        self.self_attn_layer_norm = LayerNorm(width)
        if decoder:
            self.encoder_attn = _Attention(width)
            self.encoder_attn_layer_norm = LayerNorm(width)
        self.fc1, self.fc2 = Linear(width, ffn), Linear(ffn, width)
        self.final_layer_norm = LayerNorm(width)
        self.activation_fn = ACTIVATIONS[config.activation_function]


class _Stack(nn.Module):
    def __init__(self, config, shared: nn.Embedding, layers: int, ffn: int, decoder: bool):
        super().__init__()
        self.embed_tokens = shared
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_positions = Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(_Layer(config, ffn, decoder) for _ in range(layers))


class _Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = _Stack(config, self.shared, config.encoder_layers, config.encoder_ffn_dim, False)
        self.decoder = _Stack(config, self.shared, config.decoder_layers, config.decoder_ffn_dim, True)


class DirectMarian(DirectModel):
    """A MarianMTModel's weights under its names (embeddings shared and tied), with its configs."""

    def __init__(self, config, generation_config):
        super().__init__(config, generation_config)
        self.model = _Body(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.shared.weight
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared


def lean_reason(config) -> str | None:
    """None when DirectMarian holds a checkpoint of this config as the fast backend runs it."""
    if config.normalize_before or getattr(config, "add_final_layer_norm", False):
        return "a pre-LN Marian checkpoint"
    if not (getattr(config, "share_encoder_decoder_embeddings", True) and config.tie_word_embeddings):
        return "untied embeddings"
    if config.activation_function not in ACTIVATIONS:
        return f"the activation '{config.activation_function}'"
    return None


_SHARED = "model.shared.weight"
_TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
_POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


def load_direct_marian(directory: str, name: str, config, device: torch.device, dtype: torch.dtype,
                       runs_as: str) -> DirectMarian:
    """The checkpoint in `directory` (a MarianConfig's) on `device` as `dtype`, read as transformers
    reads it: tied copies dropped, missing position tables computed and a missing bias zero."""
    status(f"loading {name} on {device} ({runs_as})")
    tensors = read_weights(directory, device, dtype, name)
    shared = tensors.get(_SHARED)
    if shared is None:
        shared = next((tensors[key] for key in _TIED if key in tensors), None)
    if shared is not None:  # one tensor under every name that shares it, as in MarianMTModel
        tensors.update(dict.fromkeys((_SHARED, *_TIED), shared))
    table = sinusoidal_table(config.max_position_embeddings, config.d_model, dtype).to(device)
    for key in _POSITIONS:
        tensors.setdefault(key, table)
    tensors.setdefault("final_logits_bias", torch.zeros(1, config.vocab_size, dtype=dtype, device=device))
    with torch.device("meta"):
        model = DirectMarian(config, generation_config_of(directory, config))
    return fill(model, tensors, name)
