"""The whole pipeline: detect -> translate (ja->en) -> answer -> translate (en->ja) -> render.

`BilingualQA` loads the three models once per process and runs the one composition of the stages
(flow.py) on them: for one question (`ask`), many together (`ask_batch`, each stage batched across
questions), or streamed (`ask_events`, `stream_text`). A server runs the same composition on its
batching stages (serve/service.py).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch

from pipeline.errors import BilingualQAError
from pipeline.flow import Event, Flow, LocalStages, Question, Report, Wording, compose, run_one, run_together
from pipeline.llm.answerer import Answerer, AnswerText
from pipeline.llm.models import resolve_llm
from pipeline.loading import locate_model, resolve_device
from pipeline.mt.translator import Translator
from pipeline.spec import GenerationSettings, LoadSpec
from pipeline.text.question import MAX_QUESTION_CHARS, check_question  # noqa: F401 - part of qa's API
from pipeline.text.render import render_stream
from pipeline.text.result import QAResult

BATCH_ROWS, FAST_BATCH_ROWS = 32, 128  # questions per LLM batch of a file job (preferred_batch_rows)


def model_names(llm: str | None = None, ja_en: str | None = None, en_ja: str | None = None) -> dict[str, str]:
    """The models to load: those named, else the environment variables, else the published ones."""
    return LoadSpec.resolve(llm, ja_en, en_ja).models


class BilingualQA:
    """`answerer` may be a function that returns it: it is called when the answer stage is first
    needed (from_pretrained's lean load, whose weights are still being read meanwhile)."""

    def __init__(self, answerer: Answerer | Callable[[], Answerer], ja_en: Translator, en_ja: Translator,
                 spec: LoadSpec | None = None):
        self._answerer = answerer
        self.ja_en = ja_en
        self.en_ja = en_ja
        # What was asked for (from_pretrained's arguments); for stages built by hand, their names.
        self.spec = spec or LoadSpec.resolve(self.answerer.name, ja_en.name, en_ja.name)

    @classmethod
    def from_pretrained(cls, llm: str | None = None, ja_en: str | None = None, en_ja: str | None = None, *,
                        device: str = "auto", dtype: str | None = None, engine: str = "auto",
                        mt_backend: str = "auto", beams: int | None = None, memory=None,
                        base: str | None = None, lean: bool = False) -> "BilingualQA":
        """Load the three models (hub ids or local directories) once, onto one device.

        `llm` may be a LoRA adapter, merged into `base` (default: the base its adapter_config.json
        names, or $BILINGUAL_QA_BASE). `beams` is the translators' beam width; by default each model's
        published generation config. `memory` is both translators' translation memory (a store or an
        SQLite path; see mt/memory.py). `lean`: a process that answers and exits loads phi-2 for
        the fast engine alone where it runs (see Answerer.from_pretrained); its weights are read in
        the background while the translators load and the question is translated, and the fast
        translators' first use of the GPU is paid in another thread meanwhile (mt/prime.py).
        """
        spec = LoadSpec.resolve(llm, ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                mt_backend=mt_backend, beams=beams, base=base)
        llm, ja_en, en_ja = spec.llm, spec.ja_en, spec.en_ja
        resolved = resolve_device(device)
        source = resolve_llm(llm, base)  # a missing or unfit model fails now, before minutes of loading
        for name, option in ((ja_en, "--ja-en"), (en_ja, "--en-ja")):
            locate_model(name, option)
        weights = Answerer.read_ahead(source, resolved, dtype, engine) if lean else None
        primed = Translator.prime(device=resolved, dtype=dtype, backend=mt_backend) if lean else None
        # One after another: transformers' from_pretrained sets process-wide state while it builds a
        # model (the default device, meta-device init), so two loads in threads break each other
        # ("Tensor on device cpu is not on the expected device meta!"; docs/design.md, Cold start).
        translators = [
            Translator.from_pretrained(name, device=resolved, dtype=dtype, backend=mt_backend,
                                       target_lang=target, option=option, num_beams=beams,
                                       memory=memory)
            for name, target, option in ((ja_en, "en", "--ja-en"), (en_ja, "ja", "--en-ja"))
        ]
        if primed is not None:
            primed.result()  # no GPU work of the primer's runs beside the translations
        answerer = functools.partial(Answerer.from_pretrained, source, device=resolved, dtype=dtype, engine=engine,
                                     lean=lean, weights=weights)
        return cls(answerer if weights is not None else answerer(), *translators, spec=spec)

    @property
    def answerer(self) -> Answerer:
        if not isinstance(self._answerer, Answerer) and self._answerer is not None:
            self._answerer = self._answerer()
        return self._answerer

    @answerer.setter
    def answerer(self, answerer: Answerer | None) -> None:
        self._answerer = answerer

    @property
    def models(self) -> dict[str, str]:
        """The models' names; `llm_base` only when the LLM is a LoRA adapter (its base)."""
        base = {"llm_base": self.answerer.base_name} if self.answerer.base_name else {}
        return {"llm": self.answerer.name, **base, "ja_en": self.ja_en.name, "en_ja": self.en_ja.name}

    def ask(self, text: str, *, source_lang: str | None = None,
            settings: GenerationSettings = GenerationSettings()) -> QAResult:
        """Answer one question; a problem with it raises a BilingualQAError."""
        result = self.ask_batch([text], source_lang=source_lang, settings=settings)[0]
        if isinstance(result, BilingualQAError):
            raise result
        return result

    def ask_batch(self, texts: list[str], *, source_lang: str | None = None,
                  settings: GenerationSettings = GenerationSettings()) -> list[QAResult | BilingualQAError]:
        """Answer many questions, each stage batched across them (flow.run_together); a bad
        question gets its error in its place and the others go on."""
        results: dict[int, QAResult] = {}

        def keep(index: int, event: Event) -> None:
            if event.kind == "result":
                results[index] = QAResult.from_dict(event.data)

        flows = [self.flow(Question(text, source_lang, settings)) for text in texts]
        errors = run_together(flows, self.stages, keep)
        return [error if error is not None else results[index] for index, error in enumerate(errors)]

    def ask_events(self, text: str, *, source_lang: str | None = None,
                   settings: GenerationSettings = GenerationSettings()) -> Iterator[Event]:
        """The question's way through the pipeline as events (flow.py), the English answer piece by
        piece as phi-2 writes it; a problem with the question raises before the first."""
        return run_one(self.flow(Question(text, source_lang, settings)), self.stages)

    def stream_text(self, text: str, *, source_lang: str | None = None,
                    settings: GenerationSettings = GenerationSettings()) -> Iterator[str]:
        """The `text` layout piece by piece, the English answer as phi-2 writes it (for a terminal)."""
        return render_stream(self.ask_events(text, source_lang=source_lang, settings=settings))

    def flow(self, question: Question, *, models: dict[str, str] | None = None, wording: Wording | None = None,
             observe: Callable[[str, float], None] | None = None) -> Flow:
        """The composition of this pipeline's stages for `question` (flow.compose), reporting
        `models` (default: this pipeline's) with errors in `wording`'s words (default: the CLI's).
        The answer model is taken when the answer stage is reached (it may still be loading)."""
        report = Report((lambda: self.models) if models is None else models, self.ja_en.backend.name,
                        **({"wording": wording} if wording is not None else {}),
                        **({"observe": observe} if observe is not None else {}))
        return compose(question, lambda: self.answerer, report)

    @property
    def stages(self) -> LocalStages:
        """This process's stages, as the flow's drivers call them."""
        return LocalStages(self.ja_en, self.en_ja, lambda: self.answerer)

    def result(self, source_lang: str, question_en: str, question_ja: str, answer: AnswerText, answer_ja: str,
               timings: dict[str, float], raw: bool = False) -> QAResult:
        """One question's result from its stages' outputs (what flow.compose builds; kept for callers
        that ran the stages themselves)."""
        return QAResult(
            source_lang=source_lang, question_en=question_en, question_ja=question_ja, answer_en=answer.text,
            answer_ja=answer_ja, finish_reason=answer.finish_reason, models=self.models, timings=timings,
            engine=self.answerer.engine.name, mt_backend=self.ja_en.backend.name,
            generated_tokens=answer.generated_tokens, raw=raw,
        )

    def compare(self, text: str, llms: list[str], *, source_lang: str | None = None,
                settings: GenerationSettings = GenerationSettings(), dtype: str | None = None,
                engine: str = "auto", base: str | None = None) -> list[QAResult]:
        """The same question through several phi-2-family models (base vs fine-tune, as in the
        source article); translation models are loaded once, each LLM in turn. A base and its LoRA
        adapters share one copy of the base weights: each adapter is merged in place and removed."""
        sources = [resolve_llm(name, base) for name in llms]  # every model checked before any loads
        results = []
        device = self.answerer.model.device
        for index, source in enumerate(sources):
            if index > 0 or source.name != self.answerer.name:
                self._replace_llm(source, device, dtype, engine)
            results.append(self.ask(text, source_lang=source_lang, settings=settings))
        return results

    def _replace_llm(self, source, device: torch.device, dtype: str | None, engine: str) -> None:
        if self.answerer.shares_weights_with(source):
            self.answerer.switch_to(source)
            return
        # Free the previous model first: two 5.6 GB models need not fit on the GPU together.
        self.answerer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.answerer = Answerer.from_pretrained(source, device=device, dtype=dtype, engine=engine)

    def job_options(self) -> dict:
        """The job's fingerprint options: those of the LoadSpec this pipeline was loaded from (what
        `ask --batch` uses too, so a job started on the command line resumes from Python)."""
        return self.spec.fingerprint("ask")

    @property
    def preferred_batch_rows(self) -> int:
        """Questions per LLM batch: 128 where the fast engine has the memory for them (it decodes
        about twice as many tokens per second there as at 32), else 32."""
        engine = self.answerer.engine
        if engine.name != "fast" or getattr(engine, "max_batch_size", 0) < FAST_BATCH_ROWS:
            return BATCH_ROWS
        config = self.answerer.model.config
        # Keys and values of 128 rows of 512 positions (a question and a long answer), every layer.
        cache = 2 * config.num_hidden_layers * config.hidden_size * self.answerer.model.dtype.itemsize * 512
        free, _ = torch.cuda.mem_get_info(self.answerer.model.device)
        return FAST_BATCH_ROWS if FAST_BATCH_ROWS * cache < 0.8 * free else BATCH_ROWS

    def ask_file(self, input, output, *, source_lang: str | None = None,
                 settings: GenerationSettings = GenerationSettings(), field: str = "text", errors=None,
                 restart: bool = False, quiet: bool = False, chunk_rows: int | None = None):
        """Answer every question of a .txt/.jsonl/.csv/.tsv file into a .jsonl file, exactly once and
        resumable (see pipeline/jobs); returns a JobSummary."""
        from pipeline.jobs import workers as jobs

        return jobs.ask_file(input, output, load_qa=lambda: self, options=self.job_options(),
                             source_lang=source_lang, settings=settings, field=field, errors=errors,
                             restart=restart, quiet=quiet, chunk_rows=chunk_rows or jobs.ASK_CHUNK_ROWS)
