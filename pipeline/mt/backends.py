"""The translation backends' choice (`--mt-backend`), and the transformers backend.

The contract every backend keeps is in contract.py; the fast CUDA path (fast_marian.py) and
CTranslate2 (ctranslate2.py) are loaded only when chosen.
"""

from __future__ import annotations

import torch

from pipeline.errors import ModelLoadError
from pipeline.quiet import status
from pipeline.spec import BACKEND_CHOICES
from pipeline.mt.contract import MTBackend, right_pad, strip_special


class TransformersMTBackend:
    """MarianMTModel.generate on right-padded batches."""

    name = "transformers"
    concurrent = True  # generate keeps no state between calls

    def __init__(self, model):
        self.model = model
        self.pad_token_id = model.config.pad_token_id
        self.eos_token_id = model.config.eos_token_id

    @torch.inference_mode()
    def generate(self, batch: list[list[int]], max_new_tokens: int, num_beams: int) -> list[list[int]]:
        ids, lengths = right_pad(batch, self.pad_token_id)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
            # One more than asked: generate forces </s> into its last step, which would make a row
            # cut by the bound one token shorter than the same row in a batch with a larger bound.
            max_new_tokens=max_new_tokens + 1, num_beams=num_beams, do_sample=False,
            max_length=None, early_stopping=True if num_beams > 1 else False,
        )
        # Column 0 is the decoder start token.
        return [strip_special(row[1:], self.eos_token_id, self.pad_token_id, max_new_tokens)
                for row in out.tolist()]


def notice(message: str) -> None:
    """A one-line note for the user on stderr, beside the other status lines."""
    status(f"note: {message}", once=True)  # once, not once per translation model


def _pad_embedding_is_zero(model) -> bool:
    """CTranslate2 starts Marian's decoder from a zero vector, as the published checkpoints' pad
    row is; a checkpoint with another pad row would translate differently there."""
    weight = model.get_input_embeddings().weight
    return bool(weight[model.config.pad_token_id].abs().max() == 0)


def _ctranslate2_backend(model, model_dir) -> MTBackend:
    from pipeline.mt.ctranslate2 import CTranslate2Backend, ctranslate2_available

    if not ctranslate2_available():
        raise ModelLoadError("the ctranslate2 backend needs the optional extra: pip install 'bilingual-qa[cpu-fast]'")
    if model_dir is None:
        raise ModelLoadError("the ctranslate2 backend needs the model's directory to convert it")
    if not _pad_embedding_is_zero(model):
        raise ModelLoadError("this Marian checkpoint has a non-zero <pad> embedding, which CTranslate2 cannot reproduce")
    return CTranslate2Backend(model_dir)


def planned_choice(choice: str, device: torch.device) -> str:
    """The backend `select_mt_backend(choice, ...)` will pick on `device` (before a fallback)."""
    device = torch.device(device)
    if choice != "auto":
        return choice
    from pipeline.mt.ctranslate2 import ctranslate2_available

    return "fast" if device.type == "cuda" else (
        "ctranslate2" if device.type == "cpu" and ctranslate2_available() else "transformers")


def planned_backend(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """What `select_mt_backend(choice, ...)` will run on `device`, for the loading line: the backend
    and its precision (a fallback from auto's choice says so in its own notice)."""
    choice = planned_choice(choice, device)
    if choice == "ctranslate2":
        return "CTranslate2 int8"
    return f"{choice}, {str(dtype).removeprefix('torch.')}"


def select_mt_backend(choice: str, model, model_dir: str, device: torch.device) -> MTBackend:
    """The backend `--mt-backend` names; `auto` picks the fastest one that can serve `device`.

    auto: the fast torch path on CUDA; CTranslate2 on the CPU when installed; else transformers
    (with a one-line notice). An explicit choice that cannot serve raises ModelLoadError.
    """
    device = torch.device(device)
    if choice not in BACKEND_CHOICES:
        raise ModelLoadError(f"unknown translation backend {choice!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if choice == "transformers":
        return TransformersMTBackend(model)
    if choice == "fast":
        if device.type != "cuda":
            raise ModelLoadError("the fast translation backend needs a CUDA device; use --mt-backend auto on the CPU")
        from pipeline.mt.fast_marian import FastMarianBackend

        return FastMarianBackend(model)
    if choice == "ctranslate2":
        if device.type != "cpu":
            raise ModelLoadError("the ctranslate2 backend runs on the CPU only here; use --mt-backend fast on CUDA")
        return _ctranslate2_backend(model, model_dir)
    # auto
    if device.type == "cuda":
        from pipeline.mt.fast_marian import FastMarianBackend

        return FastMarianBackend(model)
    if device.type == "cpu":
        try:
            return _ctranslate2_backend(model, model_dir)
        except ModelLoadError as reason:
            notice(f"translating with transformers: {reason}")
            return TransformersMTBackend(model)
    return TransformersMTBackend(model)
