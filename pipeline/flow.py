"""The pipeline composed once: detect -> translate (ja->en) -> answer -> translate (en->ja) -> result,
as a sequence of events, for every caller.

`compose` is a "sans-IO" generator. It does what needs no model itself (checks the question,
detects its language, builds the prompt, turns the answer's tokens into shown pieces and finishes
them through the Answerer, times the stages, builds the result) and, for each model stage, yields a
request and is sent back the reply:

    Translate(target, texts)  ->  Translated(texts, sentences)
    Answer(prompt, settings)  ->  Tokens(ids, ended, eos)      then NextTokens() -> Tokens ... until ended

Between requests it yields `Event`s: "detected" (the question checked, its language), "question"
(in English, with its prompt's length), "english" (answer pieces, as they become safe to show),
"answered" (the answer ended), "japanese" (the answer's sentences translated), "result" (the object
of `ask --format json`). A question the pipeline refuses raises its BilingualQAError instead.

Who fulfils the requests is the driver's business, so the order of the stages is written here only:
`run_one` calls each stage in turn (a question streamed in-process), `run_together` runs many
compositions in lockstep so that each stage is one batch across them (`ask_batch`, `ask`), and
`run_async` awaits each stage on the server's batching threads (serve/service.py). The events are
what a server streams and a remote client reads back (remote/), and text/render.py's
`render_stream` shows them the same way in every case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Callable, Generator, Iterator, NamedTuple

from pipeline.errors import BilingualQAError, InputTooLongError
from pipeline.spec import GenerationSettings
from pipeline.text.detect import detect_language, require_supported
from pipeline.text.question import check_question
from pipeline.text.result import QAResult
from pipeline.text.sentences import sentences_of

# The events a server sends (the rest are for in-process callers): their names and data are an API.
SERVED_EVENTS = ("question", "english", "japanese", "result")


class Event(NamedTuple):
    """One step of a question's way through the pipeline; unpacks as (kind, data) like the server's
    stream, whose JSON `data` it is."""

    kind: str
    data: dict


@dataclass(frozen=True)
class Question:
    """What was asked: the question and the options that change its answer."""

    text: str
    source_lang: str | None = None  # forced ("ja" or "en"); None: detected
    settings: GenerationSettings = GenerationSettings()
    beams: int | None = None  # the translators' beam width; None: theirs


@dataclass(frozen=True)
class Translate:
    """A stage request: `texts` into `target` ("en": the ja->en model, "ja": en->ja); `sentences`:
    each text's sentences are wanted too, translated."""

    target: str
    texts: list[str]
    beams: int | None = None
    sentences: bool = False


@dataclass
class Translated:
    texts: list[str]
    sentences: list[list[str]] = field(default_factory=list)  # per text, when asked for


@dataclass(frozen=True)
class Answer:
    """A stage request: generate after `prompt`. `stop_check` (None when raw) is for a stage that
    generates whole rows; a streaming stage may stop as soon as the composition stops asking."""

    prompt: list[int]
    settings: GenerationSettings
    stop_check: Callable | None
    adapter: int = 0  # the engine's LoRA adapter the row applies (0: none)


@dataclass(frozen=True)
class NextTokens:
    """A stage request: the open answer's next tokens."""


@dataclass
class Tokens:
    """The answer stage's reply: the next generated ids (end-of-text never among them). `ended`: the
    stage has no more, `eos` when it stopped at end-of-text. `whole`: all of a finished row at once
    (a batch's), finished in one go instead of piece by piece."""

    ids: list[int]
    ended: bool = False
    eos: bool = False
    whole: bool = False


Request = Translate | Answer | NextTokens
Flow = Generator[Event | Request, Any, None]


class Wording:
    """The errors a caller can cause, in the words of its interface (these: the command line's)."""

    def supported(self, language: str) -> str:
        return require_supported(language)

    def too_long(self, error: InputTooLongError, max_positions: int) -> Exception:
        return error


@dataclass(frozen=True)
class Report:
    """What a result reports and how its errors read, decided by the caller once."""

    # The result's "models" (models["llm"] is the question event's "model"); a function that gives
    # them is called once the answer stage is reached (an answer model may still be loading before).
    models: dict[str, str] | Callable[[], dict[str, str]]
    mt_backend: str
    wording: Wording = Wording()
    observe: Callable[[str, float], None] = lambda stage, seconds: None  # each stage's time

    def model_names(self) -> dict[str, str]:
        return dict(self.models() if callable(self.models) else self.models)


class _Clock:
    def __init__(self, observe: Callable[[str, float], None]):
        self.observe, self.timings = observe, {}
        self.start = self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self.last, 4)
        self.observe(stage, now - self.last)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self.start, 4)}


def compose(question: Question, answerer, report: Report) -> Flow:
    """One question through the pipeline (see the module's docstring for the protocol). `answerer`
    (llm/answerer.py's Answerer) may be given as a function that returns it, called once the answer
    stage is reached: a lean load's weights go on loading while the question is translated."""
    clock = _Clock(report.observe)
    text = check_question(question.text)
    lang = report.wording.supported(question.source_lang or detect_language(text))
    clock.lap("detect")
    yield Event("detected", {"source_lang": lang, "question": text})
    question_en = text
    if lang == "ja":
        question_en = (yield Translate("en", [text], question.beams)).texts[0]
    clock.lap("translate_question")
    settings, answerer, models = question.settings, _now(answerer), report.model_names()
    try:
        prompt = answerer.encode(question_en, settings.max_new_tokens)
    except InputTooLongError as error:
        raise report.wording.too_long(error, answerer.max_positions) from None
    yield Event("question", {"source_lang": lang, "question_en": question_en, "model": models["llm"],
                             "prompt_tokens": len(prompt)})

    answer = yield from _answer(answerer, question_en, prompt, settings)
    clock.lap("answer")
    yield Event("answered", {"answer_en": answer.text, "finish_reason": answer.finish_reason,
                             "generated_tokens": answer.generated_tokens})

    back = [answer.text] + ([question_en] if lang == "en" else [])
    translated = yield Translate("ja", back, question.beams, sentences=True)
    answer_ja, question_ja = translated.texts[0], translated.texts[1] if lang == "en" else text
    for index, sentence in enumerate(translated.sentences[0]):
        yield Event("japanese", {"text": sentence, "index": index})
    clock.lap("translate_answer")
    result = QAResult(source_lang=lang, question_en=question_en, question_ja=question_ja, answer_en=answer.text,
                      answer_ja=answer_ja, finish_reason=answer.finish_reason, models=models,
                      timings=clock.total(), engine=answerer.engine.name, mt_backend=report.mt_backend,
                      generated_tokens=answer.generated_tokens, raw=settings.raw)
    yield Event("result", result.to_dict())


def _now(answerer):
    return answerer() if callable(answerer) else answerer


def _answer(answerer, question_en: str, prompt: list[int], settings: GenerationSettings):
    """The answer stage: "english" events as the tokens come; returns the finished AnswerText."""
    pieces = answerer.pieces(question_en, settings.raw)
    stop_check = None if settings.raw else answerer.stop_check([question_en])
    reply: Tokens = yield Answer(prompt, settings, stop_check, answerer.adapter)
    if reply.whole:  # a row generated whole: its pieces would all arrive at once anyway
        answer = answerer.finish_tokens(question_en, prompt, reply.ids, reply.eos, settings)
        if answer.text:
            yield Event("english", {"text": answer.text})
        return answer
    while True:
        shown = ""
        for token in reply.ids:
            shown += pieces.push(token)
            if pieces.ended:
                break
        if shown:
            yield Event("english", {"text": shown})
        if pieces.ended or reply.ended:
            break
        reply = yield NextTokens()
    # Ended where the answer did (not at end-of-text, whatever the stage wrote after it).
    answer = answerer.finish_tokens(question_en, prompt, pieces.ids, reply.eos and not pieces.ended, settings)
    if tail := pieces.finish():
        yield Event("english", {"text": tail})
    return answer


# ---- drivers --------------------------------------------------------------------------------------

def _stage(request: Request) -> int:
    """Where a request stands in the flow: a lockstep driver fulfils the earliest first, so each
    stage's batch holds every question that reaches it."""
    if isinstance(request, Translate):
        return 0 if request.target == "en" else 3
    return 1 if isinstance(request, Answer) else 2


def run_one(flow: Flow, stages) -> Iterator[Event]:
    """The events of one composition, each stage called in turn: `stages.translate(Translate)` ->
    Translated, `stages.answer(Answer)` -> a source with `next()` -> Tokens and `close()` (called once
    the answer is over)."""
    reply, source = None, None
    try:
        while True:
            try:
                item = flow.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(item, Event):
                yield item
            else:
                source, call = _stage_call(item, stages, source)
                reply = call()
    finally:
        _closed(source)
        flow.close()


def _stage_call(item: Request, stages, source):
    """The stage call that answers one request, and the token source open after it: run_one calls it,
    run_async awaits it (one routing for both drivers). A translation closes the answer's source first,
    so its row is freed before the answer is translated back."""
    if isinstance(item, Answer):
        source = stages.answer(item)
    if isinstance(item, (Answer, NextTokens)):
        return source, source.next
    return _closed(source), partial(stages.translate, item)


def _closed(source) -> None:
    if source is not None:
        source.close()
    return None


def run_together(flows: list[Flow], stages, on_event: Callable[[int, Event], None]) -> list[BilingualQAError | None]:
    """Many compositions in lockstep, each stage one call across all of them: `stages.translate_all`
    (Translate requests of one target and beams) -> a Translated each, `stages.generate(Answer
    requests of one settings)` -> whole rows (Tokens). Each event goes to `on_event(index, event)`;
    returns each composition's error (None where it ended with a result). A batched stage call that
    a BilingualQAError refuses is made again per composition, so only the one at fault fails."""
    errors: list[BilingualQAError | None] = [None] * len(flows)
    replies: dict[int, Any] = {index: None for index in range(len(flows))}
    waiting: dict[int, Request] = {}
    while replies or waiting:
        for index, reply in replies.items():
            if (request := _advance(flows[index], reply, index, on_event, errors)) is not None:
                waiting[index] = request
        replies = {}
        if not waiting:
            break
        first = min(_stage(request) for request in waiting.values())
        # In the questions' order, as each batch always was (a seeded sample depends on its row).
        chosen = {index: waiting[index] for index in sorted(waiting) if _stage(waiting[index]) == first}
        for index in chosen:
            del waiting[index]
        for group in _groups(chosen):
            replies.update(_fulfil(stages, group, flows, on_event, errors, waiting))
    return errors


def _advance(flow: Flow, reply, index: int, on_event, errors, throw: BaseException | None = None):
    """Run one composition to its next request (None: it ended, with a result or an error)."""
    try:
        item = flow.throw(throw) if throw is not None else flow.send(reply)
        while isinstance(item, Event):
            on_event(index, item)
            item = flow.send(None)
        return item
    except StopIteration:
        return None
    except BilingualQAError as error:
        errors[index] = error
        return None


def _groups(chosen: dict[int, Request]) -> list[dict[int, Request]]:
    """Requests that one stage call can serve together (one target and beams; one settings)."""
    groups: dict[tuple, dict[int, Request]] = {}
    for index, request in chosen.items():
        key = (request.target, request.beams) if isinstance(request, Translate) else (type(request), request.settings)
        groups.setdefault(key, {})[index] = request
    return list(groups.values())


def _fulfil(stages, group: dict[int, Request], flows, on_event, errors, waiting) -> dict[int, Any]:
    call = stages.translate_all if isinstance(next(iter(group.values())), Translate) else stages.generate
    try:
        return dict(zip(group, call(list(group.values()))))
    except BilingualQAError as error:
        if len(group) > 1:  # whose is it? each alone
            replies = {}
            for index, request in group.items():
                replies.update(_fulfil(stages, {index: request}, flows, on_event, errors, waiting))
            return replies
        index = next(iter(group))
        # Raised inside the composition, where the stage was asked: it ends there with this error.
        if (request := _advance(flows[index], None, index, on_event, errors, throw=error)) is not None:
            waiting[index] = request
        return {}


async def run_async(flow: Flow, stages) -> AsyncIterator[Event]:
    """The events of one composition, each stage awaited: `await stages.translate(Translate)` ->
    Translated, `stages.answer(Answer)` -> a source with `await next()` -> Tokens and `close()`
    (called once the answer is over, so its row is freed at once)."""
    reply, source = None, None
    try:
        while True:
            try:
                item = flow.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(item, Event):
                yield item
            else:
                source, call = _stage_call(item, stages, source)
                reply = await call()
    finally:
        _closed(source)
        flow.close()


# ---- the in-process stages ------------------------------------------------------------------------

def translated(translator, plan, pieces: list[str], sentences: bool) -> Translated:
    """A translation plan's texts rebuilt from its pieces' translations, and each text's sentences."""
    texts = translator.assemble(plan, pieces)
    if not sentences:
        return Translated(texts)
    flat, per_text, at = translator.sentence_translations(plan, pieces), [], 0
    for layout in plan.layouts:
        count = len(sentences_of(layout))
        per_text.append(flat[at:at + count])
        at += count
    return Translated(texts, per_text)


@dataclass
class LocalStages:
    """The stages in this process: two Translators and an Answerer's engine, called directly
    (`answerer` may be a function that returns it, as for `compose`)."""

    ja_en: Any
    en_ja: Any
    answerer: Any

    @property
    def engine(self):
        return _now(self.answerer).engine

    def translate(self, request: Translate) -> Translated:
        return self.translate_all([request])[0]

    def translate_all(self, requests: list[Translate]) -> list[Translated]:
        """Requests of one target and beams, as one translation (sorted, batched, memory shared)."""
        translator = self.ja_en if requests[0].target == "en" else self.en_ja
        texts = [text for request in requests for text in request.texts]
        plan = translator.plan(texts, requests[0].beams)
        done = translated(translator, plan, translator.translate_ids(plan.ids, requests[0].beams),
                          any(request.sentences for request in requests))
        out, at = [], 0
        for request in requests:
            count = len(request.texts)
            out.append(Translated(done.texts[at:at + count], done.sentences[at:at + count]))
            at += count
        return out

    def answer(self, request: Answer) -> "TokenStream":
        """The engine's stream of the answer's ids, one reply per id (what a terminal shows)."""
        adapter = {"adapter": request.adapter} if request.adapter else {}
        return TokenStream(self.engine.stream(request.prompt, request.settings, request.stop_check, **adapter),
                           request.settings.max_new_tokens)

    def generate(self, requests: list[Answer]) -> list[Tokens]:
        """Answer requests of one settings as one batch; each row whole."""
        checks = [request.stop_check for request in requests]
        check = None if all(c is None for c in checks) else \
            (lambda row, ids: checks[row] is not None and checks[row](0, ids))
        adapters = [request.adapter for request in requests]
        rows = self.engine.generate([request.prompt for request in requests], requests[0].settings, check,
                                    **({"adapters": adapters} if any(adapters) else {}))
        return [Tokens(row.token_ids, ended=True, eos=row.finish_reason == "eos", whole=True) for row in rows]


class TokenStream:
    """An engine's iterator of generated ids, read as the composition reads an answer."""

    def __init__(self, ids: Iterator[int], max_new_tokens: int):
        self.ids, self.max_new_tokens, self.count = ids, max_new_tokens, 0

    def next(self) -> Tokens:
        token = next(self.ids, None)
        if token is None:
            # A stream ends at end-of-text (never yielded), a stop or the length. Short of the length
            # it is end-of-text or a stop, and the finish checks for a stop first.
            return Tokens([], ended=True, eos=self.count < self.max_new_tokens)
        self.count += 1
        return Tokens([token])

    def close(self) -> None:
        close = getattr(self.ids, "close", None)  # a generator stops its engine's work when closed
        if close is not None:
            close()
