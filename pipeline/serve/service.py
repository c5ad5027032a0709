"""The pipeline for one caller among many: the one composition of `BilingualQA.ask` (flow.py), each
stage it asks for handed to the thread that batches it across callers (batching.py, translation.py),
yielding events as each stage finishes.

detect -> translate the question (ja->en batcher) -> answer (scheduler: English streams in) ->
translate the answer (en->ja batcher: Japanese per sentence) -> the result object of `ask --format json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from pipeline.errors import BilingualQAError, InputTooLongError, UnsupportedLanguageError
from pipeline.flow import (SERVED_EVENTS, Answer, Event, Question, Tokens, Translate, Translated, Wording, run_async,
                           translated)
from pipeline.serve.batching import AnswerJob, AnswerScheduler
from pipeline.serve.models import ModelRegistry
from pipeline.spec import GenerationSettings
from pipeline.text.detect import SUPPORTED_LANGUAGES

LANGUAGE_NAMES = {"en": "English", "ja": "Japanese"}
GONE_POLL_SECONDS = 0.1  # how often a non-streaming request looks whether its caller is still there


@dataclass(frozen=True)
class AskRequest:
    question: str
    source_lang: str | None = None
    model: str | None = None
    settings: GenerationSettings = GenerationSettings()
    beams: int | None = None
    raw: bool = False
    tokens_field: str = "max_new_tokens"  # what the caller's API calls the answer's token limit
    source_field: str | None = "source_lang"  # the field that forces the question's language, if any


class Service:
    def __init__(self, models: ModelRegistry, observe=lambda stage, seconds: None):
        self.models = models
        self.observe = observe  # stage latency hook (metrics)

    async def ask(self, request: AskRequest, gone: Callable[[], Awaitable[bool]] | None = None) -> dict | None:
        """The whole result object; a problem with the question raises a BilingualQAError. None when
        `gone()` (the HTTP layer's disconnect check) says the caller left first: its answer's row is
        freed at the next decode step instead of running to its end for nobody."""
        return await until_gone(result_of(self.ask_events(request)), gone)

    async def ask_events(self, request: AskRequest) -> AsyncIterator[Event]:
        """("question", ...), ("english", {"text"})..., ("japanese", {"text", "index"})..., ("result", ...):
        the one composition (flow.py) on the server's batching stages, as a server sends it.

        Everything the caller can get wrong is raised before the first event."""
        served, qa, scheduler = self.models.get(request.model)
        settings = dataclasses.replace(request.settings, raw=request.raw)
        flow = qa.flow(Question(request.question, request.source_lang, settings, request.beams),
                       models=self.models.models_of(served),  # names, not this machine's paths
                       wording=_ApiWording(served, request), observe=self.observe)
        # Closed with this generator, not later by the collector: its `finally` frees the answer's row.
        async with contextlib.aclosing(run_async(flow, _ServerStages(self.models, scheduler))) as events:
            async for event in events:
                if event.kind in SERVED_EVENTS:
                    yield event

    async def translate(self, texts: list[str], source: str, target: str,
                        beams: int | None = None) -> tuple[list[str], list[dict]]:
        """Each text in `target` (copied where it already is) and each text's detected language."""
        if target not in LANGUAGE_NAMES:
            raise BilingualQAError(f"target must be 'ja' or 'en', not '{target}'")
        detected = _detect_each(await self.models.detector.languages(texts, source))
        todo = [index for index, found in enumerate(detected) if found["language"] != target]
        batcher = self.models.ja_en if target == "en" else self.models.en_ja
        out = list(texts)
        if todo:
            for index, text in zip(todo, await batcher.translate([texts[i] for i in todo], beams)):
                out[index] = text
        return out, detected


class _ServerStages:
    """The stages of flow.py's requests, each on the server's threads that batch it across callers:
    the translators' TranslationBatchers and the model's AnswerScheduler (an AnswerJob per answer)."""

    def __init__(self, models: ModelRegistry, scheduler: AnswerScheduler):
        self.models, self.scheduler = models, scheduler

    async def translate(self, request: Translate) -> Translated:
        batcher = self.models.ja_en if request.target == "en" else self.models.en_ja
        if not request.sentences:
            return Translated(await batcher.translate(request.texts, request.beams))
        plan = await batcher.plan(request.texts, request.beams)
        pieces = await asyncio.wrap_future(batcher.submit(plan.ids, request.beams))
        texts = await batcher.assemble(plan, pieces)
        return Translated(texts, translated(batcher.translator, plan, pieces, True).sentences)

    def answer(self, request: Answer) -> "_JobTokens":
        job = AnswerJob(request.prompt, request.settings, asyncio.get_running_loop(), stop_check=request.stop_check,
                        adapter=request.adapter)
        self.scheduler.submit(job)
        return _JobTokens(job)


class _JobTokens:
    """An AnswerJob as the composition reads an answer: Tokens until the end; closing it cancels the
    job, which frees its row at once (the caller left, or the answer has ended)."""

    def __init__(self, job: AnswerJob):
        self.job = job

    async def next(self) -> Tokens:
        try:
            return Tokens(await self.job.__anext__())
        except StopAsyncIteration:
            return Tokens([], ended=True, eos=self.job.eos)

    def close(self) -> None:
        self.job.cancel()


class _ApiWording(Wording):
    """The question's errors in the API's words: its field names and the model's served name."""

    def __init__(self, served: str, request: AskRequest):
        self.served, self.request = served, request

    def supported(self, language: str) -> str:
        return _supported(language, self.request.source_field)

    def too_long(self, error: InputTooLongError, max_positions: int) -> Exception:
        return InputTooLongError(
            f"the question is too long for {self.served}: it reads at most {max_positions} tokens, the question in"
            f" English and {self.request.settings.max_new_tokens} for the answer ({self.request.tokens_field})")


async def result_of(events: AsyncIterator[tuple[str, dict]]) -> dict | None:
    """The "result" event's data, the other events read and dropped."""
    result = None
    async for kind, data in events:
        if kind == "result":
            result = data
    return result


async def until_gone(work: Awaitable, gone: Callable[[], Awaitable[bool]] | None):
    """`work`'s result, or None once `gone()` is true: then `work` is cancelled (a pipeline's
    `finally` cancels its answer job, which frees the row at the next step), and so it is when this
    is cancelled (a request cut at shutdown); either way `work` has finished cancelling on return."""
    task = asyncio.ensure_future(work)
    if gone is None:
        return await task
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL_SECONDS)
            if done:
                return task.result()
            if await gone():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its `finally` blocks run now, not after the loop has closed


def _detect_each(found: list[tuple[str, float]]) -> list[dict]:
    """The detector's (language, confidence) of each text, each language one the pipeline takes."""
    return [{"language": _supported(language, "source"), "confidence": confidence} for language, confidence in found]


def _supported(language: str, field: str | None) -> str:
    """`language` if the pipeline takes it, else an error in the API's words (`field` forces one)."""
    if language in SUPPORTED_LANGUAGES:
        return language
    hint = f"; if it is one of those, send \"{field}\": \"ja\" or \"en\"" if field else ""
    raise UnsupportedLanguageError(f"the text looks like '{language}', but only Japanese (ja) and English (en)"
                                   f" are supported{hint}", language=language)


