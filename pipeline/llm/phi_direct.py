"""phi-2's weights for the fast engine alone: plain torch modules named as PhiForCausalLM's.

The fast engine reads the layers' tensors (phi_weights.py) and never runs transformers' module, so
where it alone will run the model (`Answerer.from_pretrained(lean=True)` on CUDA, the one-shot `ask`)
the checkpoint is read straight into these modules (pipeline/weights.py). The tree has exactly
PhiForCausalLM's parameter names, so the same checkpoints (and the phi-msft conversion) fit it; it
has no forward, so nothing but the fast engine can run it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.quiet import status
from pipeline.weights import DirectModel, Embedding, LayerNorm, Linear, fill, generation_config_of, read_weights


class _Attention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.dense = (Linear(hidden, hidden) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(hidden, inner), Linear(inner, hidden)


class _Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = _Attention(config.hidden_size)
        self.mlp = _MLP(config.hidden_size, config.intermediate_size)


class _Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class DirectPhi(DirectModel):
    """A PhiForCausalLM's weights under its names, with its config and generation config."""

    def __init__(self, config, generation_config):
        super().__init__(config, generation_config)
        self.model = _Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)


def load_direct_phi(directory: str, name: str, config, device: torch.device, dtype: torch.dtype,
                    convert=None, tensors: dict | None = None) -> DirectPhi:
    """The checkpoint in `directory` (of `config`, a PhiConfig) on `device` as `dtype`; `convert`
    renames another layout's tensors (legacy_phi.convert_state_dict). `tensors`: its tensors,
    already read (weights.read_in_background)."""
    if tensors is None:
        status(f"loading {name} on {device} ({str(dtype).removeprefix('torch.')})")
        tensors = read_weights(directory, device, dtype, name)
    if convert is not None:
        tensors = convert(tensors)
    embed = tensors.get("model.embed_tokens.weight")
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in tensors and embed is not None:
        tensors["lm_head.weight"] = embed
    with torch.device("meta"):
        model = DirectPhi(config, generation_config_of(directory, config))
    return fill(model, tensors, name)
