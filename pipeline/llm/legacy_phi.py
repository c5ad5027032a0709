"""phi-2 checkpoints in the older custom-code layout (`model_type: phi-msft`), loaded natively.

Before January 2024 phi-2 and its full fine-tunes shipped as remote code: one fused `Wqkv` projection
per layer, `out_proj`, `lm_head.ln` and `lm_head.linear`, and a config of their own field names
(`n_embd`, `n_layer`, `rotary_dim`...). transformers reads them only with `trust_remote_code`, which
we never pass. The math is the same as `PhiForCausalLM`'s, so the weights are renamed, and `Wqkv`
split into q, k and v, as they are read (the mapping of transformers' former
`convert_phi_weights_to_hf.py`; `Wqkv`'s rows are q, k, v in that order, each heads x head_dim).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.errors import ModelLoadError
from pipeline.quiet import status
from pipeline.weights import read_weights

LEGACY_MODEL_TYPES = ("phi-msft",)

# Renames of whole-name prefixes and suffixes; `Wqkv` is split separately.
_GLOBAL_NAMES = {
    "transformer.embd.wte.weight": "model.embed_tokens.weight",
    "lm_head.ln.weight": "model.final_layernorm.weight",
    "lm_head.ln.bias": "model.final_layernorm.bias",
    "lm_head.linear.weight": "lm_head.weight",
    "lm_head.linear.bias": "lm_head.bias",
}
_LAYER_NAMES = {
    "ln": "input_layernorm",
    "mixer.out_proj": "self_attn.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")


def is_legacy_phi(config: dict) -> bool:
    return config.get("model_type") in LEGACY_MODEL_TYPES


def phi_config_from_legacy(legacy: dict, eos_token_id: int | None = None):
    """A PhiConfig from a phi-msft config.json, read by its own field names."""
    from transformers import PhiConfig

    try:
        hidden, heads = int(legacy["n_embd"]), int(legacy["n_head"])
        config = PhiConfig(
            vocab_size=int(legacy["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(legacy.get("n_inner") or 4 * hidden),
            num_hidden_layers=int(legacy["n_layer"]), num_attention_heads=heads,
            num_key_value_heads=int(legacy.get("n_head_kv") or heads),
            hidden_act=legacy.get("activation_function", "gelu_new"),
            max_position_embeddings=int(legacy.get("n_positions", 2048)),
            layer_norm_eps=float(legacy.get("layer_norm_epsilon", 1e-5)),
            partial_rotary_factor=int(legacy.get("rotary_dim", hidden // heads)) / (hidden // heads),
            resid_pdrop=float(legacy.get("resid_pdrop", 0.0)), embd_pdrop=float(legacy.get("embd_pdrop", 0.0)),
            attention_dropout=float(legacy.get("attn_pdrop", 0.0)),
            tie_word_embeddings=bool(legacy.get("tie_word_embeddings", False)),
            bos_token_id=legacy.get("bos_token_id", eos_token_id),
            eos_token_id=legacy.get("eos_token_id", eos_token_id),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelLoadError(f"the phi-msft config.json lacks or mangles {error}: cannot read it") from None
    config.architectures = ["PhiForCausalLM"]
    return config


def convert_state_dict(legacy: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """phi-msft tensor names -> PhiForCausalLM's; `Wqkv` split into q_proj, k_proj and v_proj."""
    converted = {}
    for key, tensor in legacy.items():
        if "rotary_emb" in key:  # inv_freq buffers saved by some versions; recomputed from the config
            continue
        if key in _GLOBAL_NAMES:
            converted[_GLOBAL_NAMES[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ModelLoadError(f"unexpected tensor '{key}' in a phi-msft checkpoint")
        layer, module, kind = match.groups()
        prefix = f"model.layers.{layer}."
        if module == "mixer.Wqkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(hidden, dim=0)):
                converted[f"{prefix}self_attn.{name}.{kind}"] = part
        elif module in _LAYER_NAMES:
            converted[f"{prefix}{_LAYER_NAMES[module]}.{kind}"] = tensor
        else:
            raise ModelLoadError(f"unexpected tensor '{key}' in a phi-msft checkpoint")
    return converted


def load_legacy_phi(directory: str, name: str, device: torch.device, dtype: torch.dtype, eos_token_id: int | None):
    """A PhiForCausalLM on `device` from a phi-msft checkpoint directory; no remote code runs."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig, PhiForCausalLM

    legacy = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    config = phi_config_from_legacy(legacy, eos_token_id)
    status(f"loading {name} on {device} ({str(dtype).removeprefix('torch.')}; phi-msft layout, converted)")
    state = convert_state_dict(read_weights(directory, device, name=name), config.hidden_size)
    with init_empty_weights(include_buffers=False):  # parameters on meta; the rotary buffers are real
        model = PhiForCausalLM(config)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ModelLoadError(f"cannot load model '{name}': phi-msft weights do not match its config"
                             f" (missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        model.load_state_dict({key: t.to(dtype) for key, t in state.items()}, assign=True)
    except RuntimeError as error:
        raise ModelLoadError(f"cannot load model '{name}': {str(error).strip().splitlines()[-1].strip()}") from None
    model.generation_config = GenerationConfig.from_model_config(config)
    return model.to(device).eval()
