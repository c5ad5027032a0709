"""Stage 3: answer an English question with phi-2 (or a phi-2-family fine-tune).

The prompt is the model card's QA format, `Instruct: <question>\\nOutput:`. Generation runs on an
engine (engine.py: transformers' `generate`; fast_engine.py: static cache and CUDA graphs) and stops
at end-of-text or as soon as the answer has ended (text/answer_end.py: phi-2 invents a new question
or turn); the text is trimmed by the same rules (`finish`), which every caller gets from here. With
`settings.raw` phi-2 writes until end-of-text or the length limit and nothing is trimmed. What runs
on this machine (dtype, engine, kernels) is hardware.py's plan.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.llm.adapters import AdapterError, AppliedAdapter, apply_adapter
from pipeline.llm.detokenize import GrowingText
from pipeline.llm.engine import FINISH_STOP, Engine, Generated, StopCheck, TransformersEngine, finish_row
from pipeline.llm.hardware import Plan, plan, probe
from pipeline.llm.models import LLMSource, load_llm, read_ahead, tokenizer_for
from pipeline.llm.phi_direct import DirectPhi
from pipeline.llm.prompt import prompt_ids
from pipeline.loading import DTYPES, resolve_device
from pipeline.quiet import status
from pipeline.spec import DEFAULT_LLM, GenerationSettings
from pipeline.text.answer_end import EndWatch, LineMemo, locate_answer, settled_span


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


def _runs_lean(device: torch.device, chosen: Plan) -> bool:
    """Where a lean load (phi_direct.py) may serve: the fast engine alone runs the model, on CUDA."""
    return device.type == "cuda" and chosen.engine == "fast"


def _eos(tokenizer, model) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id


class Answerer:
    def __init__(self, model, tokenizer, engine: Engine, name: str, *, source: LLMSource | None = None,
                 applied: AppliedAdapter | None = None, engine_choice: str = "auto", adapter: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = name
        self.source = source
        self.applied = applied  # the adapter merged into `model`'s weights, removable in place
        self.engine_choice = engine_choice
        self.adapter = adapter  # the engine's LoRA adapter this answerer's rows apply unmerged (0: none)
        self.max_positions = getattr(model.config, "max_position_embeddings", 2048)

    @classmethod
    def from_pretrained(cls, name: str | LLMSource = DEFAULT_LLM, *, base: str | None = None,
                        device: str | torch.device = "auto", dtype: str | None = None,
                        engine: str = "auto", lean: bool = False, weights: Future | None = None) -> "Answerer":
        """`name`: a phi-2-family checkpoint, an older phi-msft one, or a LoRA adapter (on `base`, or the
        base its adapter_config.json names); hub id, directory or an already resolved LLMSource.

        `lean`: where the fast engine runs the model on CUDA, its weights load into the engine's own
        modules (phi_direct.py), without transformers' model classes: a quicker start for a process
        that answers and exits, but the model cannot take adapters in place later (`switch_to`).
        `weights`: its tensors being read already (`read_ahead`)."""
        device = device if isinstance(device, torch.device) else resolve_device(device)
        hardware = probe(device)
        chosen = plan(hardware, dtype=dtype, engine=engine)
        if chosen.fallbacks and (dtype in (None, "auto") or engine == "auto"):
            status(f"on {hardware.name}: {chosen.summary()}")
        loaded = load_llm(name, base=base, device=device, dtype=DTYPES[chosen.dtype],
                          lean=lean and _runs_lean(device, chosen), weights=weights)
        model, tokenizer = loaded.model, loaded.tokenizer
        return cls(model, tokenizer, choose_engine(engine, model, _eos(tokenizer, model), device, chosen),
                   loaded.source.name, source=loaded.source, applied=loaded.applied, engine_choice=engine)

    @staticmethod
    def read_ahead(source: LLMSource, device: torch.device, dtype: str | None = None,
                   engine: str = "auto") -> Future | None:
        """Start reading the weights `from_pretrained(source, lean=True)` will take, in the background
        (None where it will not take them): the caller does other work meanwhile."""
        chosen = plan(probe(device), dtype=dtype, engine=engine)
        return read_ahead(source, device, DTYPES[chosen.dtype]) if _runs_lean(device, chosen) else None

    @property
    def base_name(self) -> str | None:
        """The base a LoRA adapter is merged into, else None."""
        return self.source.base_name if self.source is not None and self.source.adapter else None

    def shares_weights_with(self, source: LLMSource) -> bool:
        """Whether `source` can be served by swapping adapters on this model's base weights (not on
        a lean model's: peft merges into transformers modules only)."""
        return (self.source is not None and self.source.weights_key == source.weights_key
                and not isinstance(self.model, DirectPhi))

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

    def attach(self, source: LLMSource) -> "Answerer":
        """An answerer for the LoRA adapter `source` of this (bare) base model on the same weights and
        engine: its rows apply the adapter unmerged, so base and adapters decode in one batch."""
        if self.applied is not None or self.adapter or source.adapter is None or not self.shares_weights_with(source):
            raise ValueError(f"{source.name} is not a LoRA adapter of the bare base {self.name}")
        tokenizer = tokenizer_for(source)
        if _eos(tokenizer, self.model) != self.engine.eos_token_id:
            raise AdapterError(f"adapter '{source.name}' ships a tokenizer with another end-of-text id than its"
                               f" base '{source.base_name}': it cannot share the base's batch")
        status(f"loading adapter {source.name} beside {source.base_name} (applied unmerged, per row)")
        index = self.engine.add_adapter(source.adapter, self.model)
        return Answerer(self.model, tokenizer, self.engine, source.name, source=source,
                        engine_choice=self.engine_choice, adapter=index)

    def _adapters(self, rows: int) -> dict:
        return {"adapters": [self.adapter] * rows} if self.adapter else {}

    def stop_check(self, questions: Sequence[str]) -> StopCheck:
        """The engines' check: row i's answer (to questions[i]) has ended, so its generation may stop."""
        watches = [EndWatch(question) for question in questions]
        texts = [GrowingText(self.tokenizer, skip_special_tokens=False) for _ in questions]

        def ended(row: int, ids: Sequence[int]) -> bool:
            return watches[row](texts[row].text(ids))
        return ended

    @staticmethod
    def finish(text: str, question: str, finish_reason: str, raw: bool = False) -> tuple[str, str]:
        """The answer shown for `question` and its finish reason, from the whole text phi-2 wrote.

        `stop` when the answer ended before phi-2 did; a repeated question or a leading "Answer:"
        removed alone does not change the reason. Raw: the whole text, only its outer space stripped.
        """
        if raw:
            return text.strip(), finish_reason
        span = locate_answer(text, question)
        end = len(text) if span.end is None else span.end
        return text[span.start:end].strip(), FINISH_STOP if span.end is not None else finish_reason

    def encode(self, question: str, max_new_tokens: int) -> list[int]:
        ids = prompt_ids(self.tokenizer, question)
        if len(ids) + max_new_tokens > self.max_positions:
            raise InputTooLongError(
                f"the question is {len(ids)} tokens long in English; {self.name} reads at most"
                f" {self.max_positions} tokens, {max_new_tokens} of them kept for the answer (--max-new-tokens)"
            )
        return ids

    def answer(self, questions: list[str], settings: GenerationSettings) -> list[AnswerText]:
        """Answer English questions together, in one batch."""
        prompts = [self.encode(q, settings.max_new_tokens) for q in questions]
        generated = self.engine.generate(prompts, settings, None if settings.raw else self.stop_check(questions),
                                         **self._adapters(len(prompts)))
        return [self.answer_text(question, prompt, row, settings.raw)
                for question, prompt, row in zip(questions, prompts, generated)]

    def answer_text(self, question: str, prompt: list[int], row: Generated, raw: bool = False) -> AnswerText:
        """One generated row as the answer shown for `question` (trimmed unless `raw`)."""
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        text, reason = self.finish(text, question, row.finish_reason, raw)
        return AnswerText(text, reason, len(prompt), len(row.token_ids))

    def finish_ids(self, ids: list[int], max_new_tokens: int, question: str, raw: bool = False) -> Generated:
        """Ids generated elsewhere (the server's scheduler; end-of-text included if written) cut and
        named as the engines do."""
        check = None if raw else self.stop_check([question])
        return finish_row(ids, self.engine.eos_token_id, max_new_tokens, check)

    def finish_tokens(self, question: str, prompt: list[int], ids: list[int], eos: bool,
                      settings: GenerationSettings) -> AnswerText:
        """The answer shown for `question` from the ids an answer stage generated after `prompt`
        (`eos`: it stopped at end-of-text), cut, named and trimmed as every engine's rows are."""
        row = self.finish_ids(ids + [self.engine.eos_token_id] * eos, settings.max_new_tokens, question, settings.raw)
        return self.answer_text(question, prompt, row, settings.raw)

    def pieces(self, question: str, raw: bool = False) -> "AnswerPieces":
        """A fresh AnswerPieces for the answer to `question` (streamed piece by piece)."""
        return AnswerPieces(self.tokenizer, question, raw)

    def stream(self, question: str, settings: GenerationSettings) -> Iterator[str]:
        """The answer's text as it is generated, piece by piece: each piece as soon as no later text
        can cut it, so the pieces joined equal `answer`'s text."""
        prompt = self.encode(question, settings.max_new_tokens)
        check = None if settings.raw else self.stop_check([question])
        pieces = AnswerPieces(self.tokenizer, question, settings.raw)
        for token in self.engine.stream(prompt, settings, check, **({"adapter": self.adapter} if self.adapter else {})):
            if piece := pieces.push(token):
                yield piece
        if tail := pieces.finish():
            yield tail


class AnswerPieces:
    """Generated ids, pushed one at a time -> the shown answer's new text, each piece as soon as no
    later token can change it (the CLI's stream and the server's both). The pieces joined equal
    `Answerer.finish`'s text; `ended` turns true once the answer has ended (never when raw)."""

    def __init__(self, tokenizer, question: str, raw: bool = False):
        self.tokenizer, self.question, self.raw = tokenizer, question, raw
        self.ids: list[int] = []
        self.shown = ""
        self.ended = False
        self._start = None  # where the answer starts, once known: each push need not find it again
        self._text = GrowingText(tokenizer)  # each push decodes the newest ids, not all of them
        self._memo = LineMemo()  # and judges the lines written since the last push, not all of them

    def text(self) -> str:
        return self._text.text(self.ids)

    def push(self, token: int) -> str:
        """Add one generated id; the text that became safe to show."""
        self.ids.append(token)
        text = self.text()
        if self.raw:  # the whole text; only a partly decoded character and trailing space wait
            ready = text.lstrip().rstrip("\ufffd").rstrip()
        else:
            ready, span = settled_span(text, self.question, self._start, self._memo)
            self._start, self.ended = span.start, span.end is not None
        return self._show(ready)

    def finish(self) -> str:
        """The rest of the answer once generation is over."""
        return self._show(Answerer.finish(self.text(), self.question, "", self.raw)[0])

    def _show(self, ready: str) -> str:
        if len(ready) <= len(self.shown):
            return ""
        piece, self.shown = ready[len(self.shown):], ready
        return piece
