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
from pipeline.llm.engine import FINISH_STOP, Engine, Generated, GenerationSettings, TransformersEngine, finish_row
from pipeline.loading import load_pretrained, load_tokenizer, locate_model, resolve_device, resolve_dtype, status
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


class Answerer:
    def __init__(self, model, tokenizer, engine: Engine, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = name
        self.max_positions = getattr(model.config, "max_position_embeddings", 2048)

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_LLM, *, device: str | torch.device = "auto",
                        dtype: str | None = None, engine: str = "auto") -> "Answerer":
        from transformers import AutoModelForCausalLM

        device = device if isinstance(device, torch.device) else resolve_device(device)
        directory = locate_model(name, "--llm")
        model = load_pretrained(AutoModelForCausalLM, directory, name, device, resolve_dtype(dtype, device))
        tokenizer = load_tokenizer(directory, name)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        return cls(model, tokenizer, choose_engine(engine, model, eos, device), name)

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
        return [self.answer_text(prompt, row) for prompt, row in zip(prompts, generated)]

    def answer_text(self, prompt: list[int], row: Generated) -> AnswerText:
        """One generated row as the answer's text, trimmed at its first stop."""
        text, cut = trim_answer(self.tokenizer.decode(row.token_ids, skip_special_tokens=True))
        return AnswerText(text, FINISH_STOP if cut else row.finish_reason, len(prompt), len(row.token_ids))

    def finish_ids(self, ids: list[int], max_new_tokens: int) -> Generated:
        """Generated ids (end-of-text included if written) cut and named as the engines do."""
        return finish_row(ids, self.engine.eos_token_id, max_new_tokens, self._stops)

    def stream(self, question: str, settings: GenerationSettings) -> Iterator[str]:
        """The answer's text as it is generated, piece by piece, ending at the first stop."""
        prompt = self.encode(question, settings.max_new_tokens)
        pieces = TextPieces(self.tokenizer)
        for token in self.engine.stream(prompt, settings, self._stops):
            piece, stopped = pieces.push(token)
            if piece:
                yield piece
            if stopped:
                break
        if last := pieces.finish():
            yield last


class TextPieces:
    """Generated ids -> new text as it becomes safe to show, ending at the first stop line."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> tuple[str, bool]:
        """(text ready to show since the last call, whether a stop line has appeared)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if find_stop(text) is not None:
            return "", True
        # Hold back half a character and a short last line: it may be the start of a stop line.
        line_start = text.rfind("\n") + 1
        ready = text.rstrip("\ufffd") if len(text) - line_start >= HOLD_BACK else text[:line_start]
        if len(ready) > self.shown:
            piece, self.shown = ready[self.shown:], len(ready)
            return piece, False
        return "", False

    def finish(self) -> str:
        """The rest of the answer, trimmed at its stop."""
        final = trim_answer(self.tokenizer.decode(self.ids, skip_special_tokens=True))[0]
        piece = final[self.shown:] if len(final) > self.shown else ""
        self.shown = max(self.shown, len(final))
        return piece
