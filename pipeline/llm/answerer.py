"""Stage 3: answer an English question with phi-2 (or a phi-2-family fine-tune).

The prompt is the model card's QA format, `Instruct: <question>\\nOutput:`. Generation runs on an
engine (engine.py: transformers' `generate`; fast_engine.py: static cache and CUDA graphs),
stops at end-of-text or where phi-2 starts a new turn (text/answer_end.py), and the text is trimmed
there. What runs on this machine (dtype, engine, kernels) is hardware.py's plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.llm.engine import FINISH_STOP, Engine, GenerationSettings, TransformersEngine
from pipeline.llm.hardware import Plan, plan, probe
from pipeline.loading import DTYPES, load_pretrained, load_tokenizer, locate_model, resolve_device, status
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


def choose_engine(choice: str, model, eos_token_id: int, device: torch.device, chosen: Plan | None = None) -> Engine:
    """The engine `--engine` names; `auto` takes the fast one wherever it can serve, with the plan's
    kernels, graphs and attention settings (default: the plan for this device and the model's dtype)."""
    if chosen is None:
        chosen = plan(probe(device), dtype=str(model.dtype).removeprefix("torch."), engine=choice)
    if choice == "transformers":
        return TransformersEngine(model, eos_token_id, fp32_attention_scores=chosen.fp32_attention_scores)
    from pipeline.llm.fast_engine import FastPhiEngine

    reason = FastPhiEngine.unsupported_reason(model, device)
    if reason is None:
        return FastPhiEngine(model, eos_token_id, use_triton=chosen.triton_kernels, config=chosen.decode_config())
    if choice == "fast":
        raise ModelLoadError(f"--engine fast cannot serve here: {reason}; use --engine transformers")
    status(f"using transformers' generate ({reason})")
    return TransformersEngine(model, eos_token_id, fp32_attention_scores=chosen.fp32_attention_scores)


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
        hardware = probe(device)
        chosen = plan(hardware, dtype=dtype, engine=engine)
        if chosen.fallbacks and (dtype in (None, "auto") or engine == "auto"):
            status(f"on {hardware.name}: {chosen.summary()}")
        directory = locate_model(name, "--llm")
        model = load_pretrained(AutoModelForCausalLM, directory, name, device, DTYPES[chosen.dtype])
        tokenizer = load_tokenizer(directory, name)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        return cls(model, tokenizer, choose_engine(engine, model, eos, device, chosen), name)

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
