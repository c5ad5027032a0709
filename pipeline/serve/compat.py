"""APIs that existing clients speak: LibreTranslate's (/translate, /detect, /languages) and OpenAI's
(/v1/chat/completions, /v1/models), over the same Service as /v1/ask."""

from __future__ import annotations

import asyncio
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pipeline.serve.http import (HTTPError, State, check_chars, check_key, first_event, flag, generation_settings,
                                 model_field, model_request, number, shown, sse, stream_with, text_field)
from pipeline.serve.service import LANGUAGE_NAMES, AskRequest, confidence, result_of, until_gone
from pipeline.text.detect import detect_language

FORMATS = ("text", "html")


# ---- LibreTranslate ------------------------------------------------------------------------------

def _texts(state: State, fields: dict) -> tuple[list[str], bool]:
    q = fields.get("q")
    if isinstance(q, str):
        texts, many = [q], False
    elif isinstance(q, list) and q and all(isinstance(item, str) for item in q):
        texts, many = q, True
    else:
        raise HTTPError(400, "q is missing: send the text to translate as q (a string or a list of strings)")
    if len(texts) > state.config.batch_limit:
        raise HTTPError(400, f"q has {len(texts)} texts; this server's batch_limit is {state.config.batch_limit}")
    check_chars(state, texts)
    return texts, many


async def translate(request: Request) -> Response:
    state, fields = await model_request(request, forms=True)
    texts, many = _texts(state, fields)
    source = text_field(fields, "source", "auto") or "auto"
    target = text_field(fields, "target")
    if source not in ("auto", *LANGUAGE_NAMES):
        raise HTTPError(400, f"source must be 'auto', 'ja' or 'en', not {shown(source)}")
    if target not in LANGUAGE_NAMES:
        raise HTTPError(400, f"target must be 'ja' or 'en', not {shown(target)}")
    if text_field(fields, "format", "text") not in FORMATS:
        raise HTTPError(400, "format must be 'text' or 'html'")
    service = state.require_service()
    admission = state.admit()
    try:
        out, detected = await service.translate(texts, source, target, number(fields, "beams", int, None, 1, 16))
    finally:
        admission.release()
    body = {"translatedText": out if many else out[0]}
    if source == "auto":
        body["detectedLanguage"] = detected if many else detected[0]
    return JSONResponse(body)


async def detect(request: Request) -> Response:
    state, fields = await model_request(request, forms=True)
    q = fields.get("q")
    if not isinstance(q, str) or not q.strip():
        raise HTTPError(400, "q is missing: send the text whose language to detect")
    check_chars(state, [q])
    return JSONResponse(await asyncio.to_thread(_detected, q))  # a long text: off the event loop


def _detected(q: str) -> list[dict]:
    lang = detect_language(q)
    return [{"language": lang, "confidence": confidence(q, lang)}]


async def languages(request: Request) -> Response:
    return JSONResponse([{"code": code, "name": name, "targets": [other for other in LANGUAGE_NAMES if other != code]}
                         for code, name in LANGUAGE_NAMES.items()])


# ---- OpenAI ----------------------------------------------------------------------------------------

def _question(fields: dict) -> str:
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages is missing: send [{\"role\": \"user\", \"content\": \"...\"}]")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: the text ones, in order
                texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
                if not all(isinstance(text, str) for text in texts):
                    raise HTTPError(400, "messages: a content part of type text needs a string text")
                content = "".join(texts)
            if isinstance(content, str):
                return content
            raise HTTPError(400, "the last user message has no text content")
    raise HTTPError(400, "messages has no user message")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def chat_completions(request: Request) -> Response:
    state, fields = await model_request(request)
    question = _question(fields)
    check_chars(state, [question])
    if number(fields, "n", int, 1, 1, 1) != 1:
        raise HTTPError(400, "n must be 1")
    tokens_field = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    ask_request = AskRequest(question=question, model=model_field(fields),
                             settings=generation_settings(fields, tokens_field), tokens_field=tokens_field,
                             source_field=None)
    service = state.require_service()
    admission = state.admit()
    created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    streaming = flag(fields, "stream")
    try:
        events = service.ask_events(ask_request)
        first = await first_event(events)
        model, lang, prompt_tokens = first[1]["model"], first[1]["source_lang"], first[1]["prompt_tokens"]
        if not streaming:
            result = await until_gone(result_of(events), request.is_disconnected)
            if result is None:  # the caller left: its row was freed
                return Response(status_code=499)
            content = result["answer_ja"] if lang == "ja" else result["answer_en"]
            return JSONResponse({
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": _finish(result["finish_reason"])}],
                "usage": _usage(prompt_tokens, result), "bilingual_qa": result,
            })
    except BaseException:
        admission.release()
        raise
    finally:
        if not streaming:
            admission.release()

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        return sse(None, {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    def encode(kind: str, data: dict) -> bytes:
        if kind == "question":
            return chunk({"role": "assistant", "content": ""})
        if (kind == "english" and lang == "en") or (kind == "japanese" and lang == "ja"):
            return chunk({"content": data["text"]})
        if kind == "result":
            return chunk({}, _finish(data["finish_reason"]), usage=_usage(prompt_tokens, data), bilingual_qa=data)
        return b""

    return StreamingResponse(stream_with(admission, first, events, encode, closing=sse(None, "[DONE]")),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(prompt_tokens: int, result: dict) -> dict:
    completion = result["generated_tokens"]
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


async def models(request: Request) -> Response:
    state: State = request.app.state.serve
    check_key(request, state, None)
    models = state.require_service().models
    # An adapter's entry names its base ("base"; vLLM spells it "parent"): the page opens on the two.
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "bilingual-qa",
         **({"base": base} if (base := models.base_of(name)) else {})} for name in models.names]})


def routes() -> list[Route]:
    return [
        Route("/translate", translate, methods=["POST"]),
        Route("/detect", detect, methods=["POST"]),
        Route("/languages", languages, methods=["GET", "POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
