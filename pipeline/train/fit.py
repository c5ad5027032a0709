"""Whether a run fits the GPU, from the base's config.json alone (before any weight is read), and
so whether it needs gradient checkpointing.

An estimate, on the safe side: the frozen weights in the run's dtype; the adapter in float32 with
its gradient and AdamW's two moments; the activations the backward pass keeps (per layer and token
about 34 x hidden values in the run's dtype, as measured for GPT-style blocks by Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models"; the attention scores are not kept:
SDPA recomputes them), or with gradient checkpointing each layer's input plus one layer's whole
activations; the logits of one chunk of learned tokens in float32; 1 GiB for the CUDA context and
workspaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DeviceError
from pipeline.train.options import FineTune

GIB = 1 << 30
CONTEXT_BYTES = GIB
ACTIVATION_VALUES = 34  # per token, layer and hidden unit (Korthikanti et al., without attention scores)
LOSS_CHUNK = 1024  # as trainer.py's: the learned positions whose logits are computed at once


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config_file: Path) -> "Shape":
        """phi-2's config.json, in transformers' names or the older phi-msft ones."""
        config = json.loads(config_file.read_text(encoding="utf-8"))
        hidden = config.get("hidden_size") or config["n_embd"]
        return cls(hidden, config.get("num_hidden_layers") or config["n_layer"],
                   config.get("intermediate_size") or config.get("n_inner") or 4 * hidden, config["vocab_size"])


def adapter_parameters(shape: Shape, options: FineTune) -> int:
    """A and B of every adapted layer: r x (inputs + outputs)."""
    sizes = {"q_proj": 2 * shape.hidden, "k_proj": 2 * shape.hidden, "v_proj": 2 * shape.hidden,
             "dense": 2 * shape.hidden, "fc1": shape.hidden + shape.intermediate,
             "fc2": shape.hidden + shape.intermediate}
    per_layer = sum(sizes.get(name.rsplit(".", 1)[-1], 0) for name in options.target_modules)
    head = shape.hidden + shape.vocab if "lm_head" in options.target_modules else 0
    return options.lora_r * (per_layer * shape.layers + head)


def training_bytes(shape: Shape, options: FineTune, dtype_bytes: int, checkpointing: bool) -> int:
    h, layers, tokens = shape.hidden, shape.layers, options.batch_tokens
    weights = (2 * shape.vocab * h + layers * (4 * h * h + 2 * h * shape.intermediate)) * dtype_bytes
    adapter = adapter_parameters(shape, options) * 4 * 4
    layer = tokens * h * ACTIVATION_VALUES * dtype_bytes // 2
    activations = layers * tokens * h * dtype_bytes + layer if checkpointing else layers * layer
    logits = (min(tokens, LOSS_CHUNK) * 3 if checkpointing else tokens * 2) * shape.vocab * 4
    return weights + adapter + activations + logits + CONTEXT_BYTES


def choose_checkpointing(shape: Shape, options: FineTune, dtype_bytes: int, free_bytes: int | None,
                         device: str, name: str) -> bool:
    """Whether to train with gradient checkpointing (`auto`: only where the run would not fit
    without it); a DeviceError where the run cannot fit the GPU at all. `free_bytes` None: the CPU."""
    mode = options.gradient_checkpointing
    if free_bytes is None:
        return mode == "on"
    without = training_bytes(shape, options, dtype_bytes, False)
    if mode == "off" or (mode == "auto" and without <= free_bytes):
        if without > free_bytes:
            raise DeviceError(_too_small(name, device, without, free_bytes, options, False))
        return False
    needed = training_bytes(shape, options, dtype_bytes, True)
    if needed > free_bytes:
        raise DeviceError(_too_small(name, device, needed, free_bytes, options, True))
    return True


def _too_small(name: str, device: str, needed: int, free: int, options: FineTune, checkpointing: bool) -> str:
    advice = ("lower --batch-tokens or --max-length, or train on a larger GPU" if checkpointing
              else "pass --gradient-checkpointing on (or auto), or lower --batch-tokens")
    return (f"training a LoRA adapter of {name} needs about {needed / GIB:.1f} GiB on {device} "
            f"(--batch-tokens {options.batch_tokens}, gradient checkpointing {'on' if checkpointing else 'off'}), "
            f"but it has {free / GIB:.1f} GiB free: {advice}")
