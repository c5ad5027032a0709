"""Stage 3: answer an English question with phi-2 (or a phi-2-family fine-tune).

The prompt is the model card's QA format, `Instruct: <question>\\nOutput:`. Generation runs on an
engine (generation.py: transformers' `generate`; fast_generate.py: static cache and CUDA graphs),
stops at end-of-text or where phi-2 starts a new turn (stop_sequences.py), and the text is trimmed
there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.llm.engine import FINISH_STOP, Engine, GenerationSettings, TransformersEngine
from pipeline.llm.adapters import AppliedAdapter, apply_adapter
from pipeline.llm.models import LLMSource, load_llm, tokenizer_for
from pipeline.loading import resolve_device, resolve_dtype, status
from pipeline.text.answer_end import find_stop, trim_answer

DEFAULT_LLM = "microsoft/phi-2"
PROMPT = "Instruct: {question}\nOutput:"
ENGINE_CHOICES = ("auto", "fast", "transformers")
HOLD_BACK = 24  # characters of a new line held back while streaming (longer than any stop line)


@dataclass
class AnswerText:
    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int


def choose_engine(choice: str, model, eos_token_id: int, device: torch.device) -> Engine:
    """The engine `--engine` names; `auto` takes the fast one wherever it can serve."""
    if choice == "transformers":
        return TransformersEngine(model, eos_token_id)
    from pipeline.llm.fast_engine import FastPhiEngine

    reason = FastPhiEngine.unsupported_reason(model, device)
    if reason is None:
        return FastPhiEngine(model, eos_token_id)
    if choice == "fast":
        raise ModelLoadError(f"--engine fast cannot serve here: {reason}; use --engine transformers")
    status(f"using transformers' generate ({reason})")
    return TransformersEngine(model, eos_token_id)


def _eos(tokenizer, model) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id


class Answerer:
    def __init__(self, model, tokenizer, engine: Engine, name: str, *, source: LLMSource | None = None,
                 applied: AppliedAdapter | None = None, engine_choice: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = name
        self.source = source
        self.applied = applied  # the adapter merged into `model`'s weights, removable in place
        self.engine_choice = engine_choice
        self.max_positions = getattr(model.config, "max_position_embeddings", 2048)

    @classmethod
    def from_pretrained(cls, name: str | LLMSource = DEFAULT_LLM, *, base: str | None = None,
                        device: str | torch.device = "auto", dtype: str | None = None,
                        engine: str = "auto") -> "Answerer":
        """`name`: a phi-2-family checkpoint, an older phi-msft one, or a LoRA adapter (on `base`, or the
        base its adapter_config.json names); hub id, directory or an already resolved LLMSource."""
        device = device if isinstance(device, torch.device) else resolve_device(device)
        loaded = load_llm(name, base=base, device=device, dtype=resolve_dtype(dtype, device))
        model, tokenizer = loaded.model, loaded.tokenizer
        return cls(model, tokenizer, choose_engine(engine, model, _eos(tokenizer, model), device),
                   loaded.source.name, source=loaded.source, applied=loaded.applied, engine_choice=engine)

    @property
    def base_name(self) -> str | None:
        """The base a LoRA adapter is merged into, else None."""
        return self.source.base_name if self.source is not None and self.source.adapter else None

    def shares_weights_with(self, source: LLMSource) -> bool:
        """Whether `source` can be served by swapping adapters on this model's base weights."""
        return self.source is not None and self.source.weights_key == source.weights_key

    def switch_to(self, source: LLMSource) -> None:
        """Serve `source` (this model's base, or an adapter of it) by removing the merged adapter and
        merging the next in place: the base weights are read once and never held twice."""
        if not self.shares_weights_with(source):
            raise ValueError(f"{source.name} does not share {self.name}'s base weights")
        touched = False
        if self.applied is not None:
            touched = self.applied.touches_engine_copies
            self.applied.remove()
            self.applied = None
            # The model is the bare base now, whatever happens to the next merge.
            self.source = LLMSource(source.base_name or source.name, source.directory)
            self.name = self.source.name
        if source.adapter is not None:
            status(f"merging adapter {source.name} into {source.base_name} in place")
            self.applied = apply_adapter(self.model, source.adapter)
            touched |= self.applied.touches_engine_copies
        tokenizer = tokenizer_for(source)
        eos = _eos(tokenizer, self.model)
        if touched or eos != _eos(self.tokenizer, self.model):
            # The fast engine keeps copies of the fused biases (and the end-of-text id); weights it views.
            self.engine = choose_engine(self.engine_choice, self.model, eos, self.model.device)
        self.tokenizer, self.source, self.name = tokenizer, source, source.name

    def _stops(self, ids) -> bool:
        return find_stop(self.tokenizer.decode(ids, skip_special_tokens=False)) is not None

    def encode(self, question: str, max_new_tokens: int) -> list[int]:
        ids = self.tokenizer(PROMPT.format(question=question.strip()))["input_ids"]
        if len(ids) + max_new_tokens > self.max_positions:
            raise InputTooLongError(
                f"the question is {len(ids)} tokens long in English; {self.name} reads at most"
                f" {self.max_positions} tokens, {max_new_tokens} of them kept for the answer (--max-new-tokens)"
            )
        return ids

    def answer(self, questions: list[str], settings: GenerationSettings) -> list[AnswerText]:
        """Answer English questions together, in one batch."""
        prompts = [self.encode(q, settings.max_new_tokens) for q in questions]
        generated = self.engine.generate(prompts, settings, self._stops)
        answers = []
        for prompt, row in zip(prompts, generated):
            text, cut = trim_answer(self.tokenizer.decode(row.token_ids, skip_special_tokens=True))
            reason = FINISH_STOP if cut else row.finish_reason
            answers.append(AnswerText(text, reason, len(prompt), len(row.token_ids)))
        return answers

    def stream(self, question: str, settings: GenerationSettings) -> Iterator[str]:
        """The answer's text as it is generated, piece by piece, ending at the first stop."""
        prompt = self.encode(question, settings.max_new_tokens)
        ids: list[int] = []
        shown = 0
        for token in self.engine.stream(prompt, settings, self._stops):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            stop = find_stop(text)
            if stop is not None:
                break
            # Hold back half a character and a short last line: it may be the start of a stop line.
            line_start = text.rfind("\n") + 1
            ready = text.rstrip("\ufffd") if len(text) - line_start >= HOLD_BACK else text[:line_start]
            if len(ready) > shown:
                yield ready[shown:]
                shown = len(ready)
        final = trim_answer(self.tokenizer.decode(ids, skip_special_tokens=True))[0]
        if len(final) > shown:
            yield final[shown:]
