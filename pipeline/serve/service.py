"""The pipeline for one caller among many: the same stages as `BilingualQA.ask`, each handed to the
thread that batches it across callers (batching.py), yielding events as each stage finishes.

detect -> translate the question (ja->en batcher) -> answer (scheduler: English streams in) ->
translate the answer (en->ja batcher: Japanese per sentence) -> the result object of `ask --format json`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from pipeline.errors import BilingualQAError, InputTooLongError, UnsupportedLanguageError
from pipeline.llm.answerer import AnswerPieces
from pipeline.llm.engine import GenerationSettings
from pipeline.qa import check_question
from pipeline.serve.batching import AnswerJob
from pipeline.serve.models import ModelRegistry
from pipeline.text.detect import SUPPORTED_LANGUAGES, detect_language
from pipeline.text.sentences import sentences_of

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

    async def ask_events(self, request: AskRequest) -> AsyncIterator[tuple[str, dict]]:
        """("question", ...), ("english", {"text"})..., ("japanese", {"text", "index"})..., ("result", ...).

        Everything the caller can get wrong is raised before the first event."""
        served, qa, scheduler = self.models.get(request.model)
        timings: dict[str, float] = {}
        start = t = time.perf_counter()
        question = check_question(request.question)
        lang = _supported(request.source_lang or detect_language(question), request.source_field)
        t = self._lap(timings, "detect", t)
        if lang == "ja":
            question_en = (await self.models.ja_en.translate([question], request.beams))[0]
        else:
            question_en = question
        t = self._lap(timings, "translate_question", t)
        prompt = _encode(qa, served, question_en, request)
        yield "question", {"source_lang": lang, "question_en": question_en, "model": served,
                           "prompt_tokens": len(prompt)}

        answerer, raw = qa.answerer, request.raw
        pieces = AnswerPieces(answerer.tokenizer, question_en, raw)
        settings = dataclasses.replace(request.settings, raw=raw)
        job = AnswerJob(prompt, settings, asyncio.get_running_loop(),
                        stop_check=None if raw else answerer.stop_check([question_en]), adapter=answerer.adapter)
        scheduler.submit(job)
        end = {"eos": False}
        try:
            async for text in _english(job, pieces, end):
                yield "english", {"text": text}
        finally:
            job.cancel()  # frees the row at once when the caller left or the answer has ended
        ids = pieces.ids + ([answerer.engine.eos_token_id] if end["eos"] else [])
        answer = answerer.answer_text(question_en, prompt,
                                      answerer.finish_ids(ids, settings.max_new_tokens, question_en, raw), raw)
        if tail := pieces.finish():
            yield "english", {"text": tail}
        t = self._lap(timings, "answer", t)

        texts = [answer.text] + ([question_en] if lang == "en" else [])
        plan = await self.models.en_ja.plan(texts, request.beams)
        translated = await asyncio.wrap_future(self.models.en_ja.submit(plan.ids, request.beams))
        answer_ja, *question_ja = await self.models.en_ja.assemble(plan, translated)
        for index, sentence in enumerate(_sentences(qa.en_ja, plan, translated)):
            yield "japanese", {"text": sentence, "index": index}
        self._lap(timings, "translate_answer", t)
        timings["total"] = round(time.perf_counter() - start, 4)
        result = qa.result(lang, question_en, question_ja[0] if question_ja else question, answer, answer_ja,
                           timings, raw).to_dict()
        result["models"] = self.models.models_of(served)  # names, not this machine's paths
        yield "result", result

    def _lap(self, timings: dict, stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 4)
        self.observe(stage, now - since)
        return now

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


async def _english(job: AnswerJob, pieces: AnswerPieces, end: dict) -> AsyncIterator[str]:
    """The answer's new English as its tokens arrive; end["eos"] is set when it ended at end-of-text.

    Every token already there goes into one piece: under load the loop falls behind the decode
    steps, and the stream then carries fewer, longer pieces instead of falling further behind."""
    while True:
        events = [await job.events.get()]
        while not job.events.empty():
            events.append(job.events.get_nowait())
        text, ended = "", False
        for kind, value in events:
            if kind == "error":
                raise value
            if kind == "end":
                end["eos"], ended = value, True
                break
            text += pieces.push(value)
            if pieces.ended:
                ended = True
                break
        if text:
            yield text
        if ended:
            return


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


def _encode(qa, served: str, question_en: str, request: AskRequest) -> list[int]:
    """The prompt's ids, or the answerer's too-long error in the API's words (and the served name)."""
    try:
        return qa.answerer.encode(question_en, request.settings.max_new_tokens)
    except InputTooLongError:
        raise InputTooLongError(
            f"the question is too long for {served}: it reads at most {qa.answerer.max_positions} tokens, the"
            f" question in English and {request.settings.max_new_tokens} for the answer ({request.tokens_field})"
        ) from None


def _sentences(translator, plan, translated: list[str]) -> list[str]:
    """The first text's sentences, translated, in order."""
    return translator.sentence_translations(plan, translated)[:len(sentences_of(plan.layouts[0]))]
