"""PEFT LoRA adapters of phi-2: checked before any base weight is read, merged in place, removable exactly.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`), often
tokenizer files, and no `config.json`. `read_adapter` refuses what cannot serve (other PEFT types,
LoRA variants that do not merge as one delta) and `check_fits` compares every tensor it holds with
the base's shapes, built on the meta device from the base's config: a mismatch costs one line, not
minutes of loading.

`apply_adapter` loads the adapter through peft's low-level API (no PeftModel) onto the loaded base model, adds each LoRA delta
(B @ A * scaling, computed by peft in float32) to the base weight in place, copies saved whole
modules (`modules_to_save`, resized embeddings) over the base's, and takes peft's wrappers out
again: the model is a plain `PhiForCausalLM` with the same parameter storage, so both engines serve
it at full speed, and the fast engine's views of those weights stay valid. `AppliedAdapter.remove`
restores the base bit for bit: a float16 weight `W + d - d` is not always `W`, so the few elements
where it is not are kept (found at merge time) and written back; whole tensors the adapter
replaced are kept as copies on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import BilingualQAError
from pipeline.loading import ADAPTER_MARKER, CHECKPOINT_MARKER

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "served"
# Base tensors the fast engine copies (the fused biases) rather than views: replacing them needs a new engine.
_ENGINE_COPIED = (".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias",
                  ".self_attn.dense.bias", ".mlp.fc1.bias", ".mlp.fc2.bias")


class AdapterError(BilingualQAError):
    """An adapter that cannot serve: another PEFT type, a missing base, shapes that do not fit."""


@dataclass(frozen=True)
class AdapterSource:
    name: str
    directory: str
    config: dict
    shapes: dict[str, tuple[int, ...]]  # tensor name (peft's saved form) -> shape

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def has_tokenizer(self) -> bool:
        return any((Path(self.directory) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_MARKER).is_file() and not (Path(directory) / CHECKPOINT_MARKER).is_file()


def _tensor_shapes(directory: Path, name: str) -> dict[str, tuple[int, ...]]:
    safetensors_file = directory / ADAPTER_WEIGHTS[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    bin_file = directory / ADAPTER_WEIGHTS[1]
    if bin_file.is_file():  # weights_only: a pickle may not run code; mmap: only the shapes are read
        state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        return {key: tuple(t.shape) for key, t in state.items()}
    raise AdapterError(f"adapter '{name}' has no weights ({' or '.join(ADAPTER_WEIGHTS)})")


def read_adapter(directory: str, name: str) -> AdapterSource:
    """The adapter's config and tensor shapes; refuses what this pipeline cannot merge."""
    try:
        config = json.loads((Path(directory) / ADAPTER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read the adapter_config.json of '{name}': {error}") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"adapter '{name}' is a {kind or 'untyped'} PEFT adapter; only LoRA adapters are supported")
    unsupported = [key for key in ("use_dora", "lora_bias", "layer_replication", "trainable_token_indices",
                                   "target_parameters", "use_qalora", "alora_invocation_tokens")
                   if config.get(key)]
    if unsupported:
        raise AdapterError(f"adapter '{name}' uses {unsupported[0]}, a LoRA variant that cannot be merged"
                           " into phi-2's weights here; only plain LoRA adapters are supported")
    return AdapterSource(name, directory, config, _tensor_shapes(Path(directory), name))


def _base_key(key: str) -> str:
    """A saved adapter tensor's name -> the base model's name of the module or tensor it concerns."""
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def check_fits(adapter: AdapterSource, base_config, base_name: str) -> None:
    """Every tensor of the adapter against the base's shapes (meta tensors: no weight is read)."""
    from accelerate import init_empty_weights
    from transformers import PhiForCausalLM

    if getattr(base_config, "model_type", None) != "phi":
        raise AdapterError(f"adapter '{adapter.name}' has base '{base_name}', a"
                           f" '{getattr(base_config, 'model_type', '?')}' model; --llm serves phi-2-family models")
    with init_empty_weights():
        skeleton = PhiForCausalLM(base_config)
    modules = dict(skeleton.named_modules())
    params = {key: tuple(p.shape) for key, p in skeleton.named_parameters()}
    for key, shape in sorted(adapter.shapes.items()):
        target = _base_key(key)
        # (marker, axis of the saved factor, axis of the base weight that must match it)
        for marker, axis, weight_axis in ((".lora_A", 1, 1), (".lora_B", 0, 0),
                                          (".lora_embedding_A", 1, 0), (".lora_embedding_B", 0, 1)):
            if marker + "." in target or target.endswith(marker):
                module_name = target.split(marker)[0]
                module = modules.get(module_name)
                if module is None or not hasattr(module, "weight"):
                    raise AdapterError(
                        f"adapter '{adapter.name}' adapts '{module_name}', which phi-2 (PhiForCausalLM) does not"
                        f" have: it was made for another architecture or phi-2's older custom-code layout")
                weight = tuple(module.weight.shape)
                if len(shape) != 2 or shape[axis] != weight[weight_axis]:
                    raise AdapterError(f"adapter '{adapter.name}' has {key.removeprefix(PEFT_PREFIX)} of shape"
                                       f" {' x '.join(map(str, shape))}, which does not fit '{module_name}' of"
                                       f" '{base_name}' ({' x '.join(map(str, weight))})")
                break
        else:  # a whole tensor: a saved module (modules_to_save), a resized embedding, a trained bias
            if target not in params:
                raise AdapterError(f"adapter '{adapter.name}' holds '{target}', which phi-2 (PhiForCausalLM)"
                                   " does not have: it was made for another architecture")
            if shape != params[target]:
                raise AdapterError(
                    f"adapter '{adapter.name}' replaces {target} with {' x '.join(map(str, shape))}, but its base"
                    f" '{base_name}' has {' x '.join(map(str, params[target]))}: the adapter was saved from a model"
                    " of another vocabulary size (a known artefact of older peft versions)")


@dataclass
class _MergedWeight:
    weight: torch.Tensor
    layer: object  # the peft LoRA layer, kept for its factors (tiny) to recompute the same delta
    index: torch.Tensor  # flat positions where (W + d) - d != W
    values: torch.Tensor  # W's values there


@dataclass
class AppliedAdapter:
    """An adapter merged into a model's weights in place; `remove` restores the base exactly."""

    source: AdapterSource
    merged: list[_MergedWeight] = field(default_factory=list)
    replaced: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (parameter, CPU copy)
    touches_engine_copies: bool = False

    @torch.no_grad()
    def remove(self) -> None:
        for item in self.merged:
            delta = item.layer.get_delta_weight(ADAPTER_NAME)
            restored = (item.weight.float() - delta.float()).to(item.weight.dtype)
            restored.view(-1)[item.index] = item.values
            item.weight.copy_(restored)
        for parameter, copy in self.replaced:
            parameter.copy_(copy.to(parameter.device))
        self.merged, self.replaced = [], []


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@torch.no_grad()
def apply_adapter(model: torch.nn.Module, adapter: AdapterSource) -> AppliedAdapter:
    """Merge `adapter` into `model`'s weights in place (see the module docstring)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    params = dict(model.named_parameters())
    applied = AppliedAdapter(adapter)
    # Whole tensors the adapter holds: peft writes some straight into the base (resized embeddings,
    # trained biases) and we copy saved modules over the base's below; keep the originals first.
    for key in adapter.shapes:
        target = _base_key(key)
        if ".lora_" not in target and target in params:
            applied.replaced.append((params[target], params[target].detach().to("cpu", copy=True)))
            applied.touches_engine_copies |= target.endswith(_ENGINE_COPIED)
    try:
        inject_lora(model, adapter)
    except (RuntimeError, ValueError, KeyError) as error:
        undo_wrappers(model)
        applied.remove()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(f"cannot load adapter '{adapter.name}': {message}") from None
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.scaling:
            weight = module.get_base_layer().weight
            delta = module.get_delta_weight(ADAPTER_NAME).float()
            merged = (weight.float() + delta).to(weight.dtype)
            differs = ((merged.float() - delta).to(weight.dtype) != weight).view(-1).nonzero().view(-1)
            applied.merged.append(_MergedWeight(weight, module, differs, weight.reshape(-1)[differs].clone()))
            weight.copy_(merged)
        elif isinstance(module, ModulesToSaveWrapper) and ADAPTER_NAME in module.modules_to_save:
            trained = dict(module.modules_to_save[ADAPTER_NAME].named_parameters())
            for key, parameter in module.original_module.named_parameters():
                parameter.copy_(trained[key])
    undo_wrappers(model)
    return applied


def inject_lora(model: torch.nn.Module, adapter: AdapterSource, adapter_name: str = ADAPTER_NAME) -> None:
    """peft's LoRA layers (and saved-module wrappers) put into `model` under `adapter_name`, the
    adapter's weights loaded into them, the factors in float32.

    peft's low-level API rather than `PeftModel.from_pretrained`: the PeftModel wrapper (which we take
    apart at once) reads the model's `is_gradient_checkpointing`, which transformers 5 deprecates,
    so every adapter load printed a FutureWarning no user could act on."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(adapter.directory)
    config.inference_mode = True
    inject_adapter_in_model(config, model, adapter_name=adapter_name, low_cpu_mem_usage=True)
    device = next(model.parameters()).device
    # Saved under PeftModel's prefix; the model here is the base itself.
    weights = {key.removeprefix(PEFT_PREFIX): value
               for key, value in load_peft_weights(adapter.directory, device=str(device)).items()}
    loaded = set_peft_model_state_dict(model, weights, adapter_name=adapter_name, low_cpu_mem_usage=True)
    missing = [key for key in loaded.missing_keys if f".{adapter_name}." in key]
    if missing:  # left on the meta device, it would fail at the first answer
        raise KeyError(f"its weights lack {missing[0]}")
    # The factors in float32, as PeftModel keeps them (autocast_adapter_dtype): the delta added to a
    # 16-bit weight is computed at full precision.
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for layers in (module.lora_A, module.lora_B):
                if adapter_name in layers:
                    layers[adapter_name].float()
            for factors in (module.lora_embedding_A, module.lora_embedding_B):
                if adapter_name in factors:
                    factors[adapter_name] = torch.nn.Parameter(factors[adapter_name].float(), requires_grad=False)


def undo_wrappers(model: torch.nn.Module) -> None:
    """Put the base's own modules back in place of peft's wrappers (their weights hold the merge)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, child = _parent(model, name)
            setattr(parent, child, module.original_module)
        elif isinstance(module, BaseTunerLayer):
            parent, child = _parent(model, name)
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
