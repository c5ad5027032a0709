"""What `--llm NAME` (with `--base ID|DIR`) names, and loading it: the one way every caller gets phi-2.

Three kinds of checkpoint serve:
- a transformers checkpoint (`config.json`, `model_type: phi`): loaded as it is;
- phi-2's older custom-code layout (`model_type: phi-msft`): converted as it loads (legacy_phi.py);
- a PEFT LoRA adapter (`adapter_config.json`, no `config.json`): its base (`base_model_name_or_path`,
  or `--base`) is loaded as above and the adapter merged into it (adapters.py).

`resolve_llm` locates everything (downloading once) and checks it without reading a weight;
`load_llm` loads. The CLI, `compare`, batch jobs and the HTTP server all go through these two.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ModelLoadError
from pipeline.llm.adapters import AdapterError, AdapterSource, AppliedAdapter, apply_adapter, check_fits, \
    is_adapter_dir, read_adapter
from pipeline.llm.legacy_phi import LEGACY_MODEL_TYPES, convert_state_dict, is_legacy_phi, load_legacy_phi, \
    phi_config_from_legacy
from pipeline.llm.phi_direct import DirectPhi, load_direct_phi
from pipeline.llm.phi_model import unsupported_config
from pipeline.loading import load_pretrained, load_tokenizer, locate_model
from pipeline.quiet import status
from pipeline.model_files import config_from, read_tokenizer
from pipeline.weights import read_in_background

BASE_ENV = "BILINGUAL_QA_BASE"


@dataclass(frozen=True)
class LLMSource:
    """A located, checked phi-2-family model: `directory` holds the (base) weights."""

    name: str  # as the user named it (the adapter's name, for an adapter)
    directory: str
    base_name: str | None = None  # an adapter's base, as named
    adapter: AdapterSource | None = None

    @property
    def weights_key(self) -> str:
        """Two sources with the same key share base weights (an adapter can be swapped in place)."""
        return os.path.realpath(self.directory)

    @property
    def label(self) -> str:
        return f"{self.name} (LoRA adapter on {self.base_name})" if self.adapter else self.name


def _read_config(directory: str, name: str) -> dict:
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the config.json of '{name}': {error}") from None


def _model_config(directory: str, name: str):
    """The checkpoint's transformers config (a phi-msft one converted), without remote code."""
    from transformers import AutoConfig

    config = _read_config(directory, name)
    if is_legacy_phi(config):
        return phi_config_from_legacy(config)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot read the config.json of '{name}': {str(error).strip().splitlines()[0]}") from None


def resolve_llm(name: str, base: str | None = None) -> LLMSource:
    """Locate `name` (and an adapter's base) and check they can serve, reading no weights.

    `base` overrides an adapter's `base_model_name_or_path` (default: $BILINGUAL_QA_BASE); a full
    checkpoint ignores it.
    """
    base = base or os.environ.get(BASE_ENV) or None
    directory = locate_model(name, "--llm", adapters=True)
    if not is_adapter_dir(directory):
        return LLMSource(name, directory)
    adapter = read_adapter(directory, name)
    base_name = base or adapter.base_name
    if base_name is None:
        raise AdapterError(f"adapter '{name}' names no base model (base_model_name_or_path); pass --base ID|DIR")
    base_directory = locate_model(base_name, "--base")
    if is_adapter_dir(base_directory):
        raise AdapterError(f"the base of adapter '{name}', '{base_name}', is itself an adapter; pass --base"
                           " with a full phi-2 checkpoint")
    check_fits(adapter, _model_config(base_directory, base_name), base_name)
    return LLMSource(name, base_directory, base_name, adapter)


def compared_models(names: list[str], base: str | None = None) -> list[str]:
    """`compare`'s models, every one located and checked (no weights read) before the first loads, so
    none fails after an answer. One LoRA adapter alone is compared with its base, the article's
    comparison (`--llm ./my-adapter` after `finetune`, whatever the base is called where it runs);
    resolving the adapter has checked that base already."""
    sources = [resolve_llm(name, base) for name in names]
    if len(sources) == 1 and sources[0].adapter is not None:
        return [sources[0].base_name, names[0]]
    return list(names)


@dataclass
class LoadedLLM:
    source: LLMSource
    model: torch.nn.Module
    tokenizer: object
    applied: AppliedAdapter | None = None


def read_ahead(source: LLMSource, device: torch.device, dtype: torch.dtype) -> Future | None:
    """Start reading the weights a lean load of `source` takes (load_llm's `weights`) in the
    background, where it may take them: a phi or phi-msft checkpoint, no adapter (the caller knows
    the device runs lean: Answerer.read_ahead)."""
    name = source.base_name or source.name
    if source.adapter is not None:
        return None
    if _read_config(source.directory, name).get("model_type") not in ("phi", *LEGACY_MODEL_TYPES):
        return None
    status(f"loading {name} on {device} ({str(dtype).removeprefix('torch.')})")
    return read_in_background(source.directory, device, dtype, name)


def load_base(source: LLMSource, device: torch.device, dtype: torch.dtype, tokenizer,
              lean: bool = False, weights: Future | None = None) -> torch.nn.Module:
    """The (base) weights of `source` on `device`, as a PhiForCausalLM (or another native causal LM);
    `lean`: as the fast engine's own modules (phi_direct.py) where it implements the checkpoint, from
    `weights` (read_ahead's) if given."""
    name = source.base_name or source.name
    raw = _read_config(source.directory, name)
    legacy = is_legacy_phi(raw)
    if lean:
        config = (phi_config_from_legacy(raw, tokenizer.eos_token_id) if legacy
                  else config_from(raw) or _model_config(source.directory, name))
        if unsupported_config(config) is None:
            convert = (lambda tensors: convert_state_dict(tensors, config.hidden_size)) if legacy else None
            tensors = weights.result() if weights is not None else None
            return load_direct_phi(source.directory, name, config, device, dtype, convert, tensors)
    if weights is not None:  # read for nothing: let the read end, then give its memory back
        weights.result().clear()
        torch.cuda.empty_cache()
    if legacy:
        return load_legacy_phi(source.directory, name, device, dtype, tokenizer.eos_token_id)
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, source.directory, name, device, dtype)


def tokenizer_for(source: LLMSource, lean: bool = False):
    """The adapter's tokenizer when it ships one, else the checkpoint's; `lean` (no transformers
    model will be built): read without transformers where model_files.py can."""
    if source.adapter is not None and source.adapter.has_tokenizer:
        return load_tokenizer(source.adapter.directory, source.name)
    tokenizer = read_tokenizer(source.directory) if lean else None
    if tokenizer is not None:
        return tokenizer
    from transformers.utils import logging

    # AutoTokenizer reads config.json too, and warns that phi-msft is no transformers model type.
    quiet = is_legacy_phi(_read_config(source.directory, source.base_name or source.name))
    previous = logging.get_verbosity()
    if quiet:
        logging.set_verbosity_error()
    try:
        return load_tokenizer(source.directory, source.base_name or source.name)
    finally:
        logging.set_verbosity(previous)


def load_llm(name: str | LLMSource, *, base: str | None = None, device: torch.device,
             dtype: torch.dtype, lean: bool = False, weights: Future | None = None) -> LoadedLLM:
    """`--llm NAME` [`--base ID|DIR`] loaded on `device`: a model and its tokenizer, adapters merged.
    `lean` (no adapter): the fast engine's modules where it can run the model, from `weights`
    (read_ahead's) if given (load_base)."""
    source = name if isinstance(name, LLMSource) else resolve_llm(name, base)
    lean = lean and source.adapter is None
    tokenizer = tokenizer_for(source, lean)
    model = load_base(source, device, dtype, tokenizer, lean, weights)
    if lean and not isinstance(model, DirectPhi):  # transformers' model after all: its tokenizer with it
        tokenizer = tokenizer_for(source)
    applied = None
    if source.adapter is not None:
        status(f"merging adapter {source.name} into {source.base_name}")
        applied = apply_adapter(model, source.adapter)
    return LoadedLLM(source, model, tokenizer, applied)
