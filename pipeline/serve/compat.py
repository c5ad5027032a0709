"""APIs that existing clients speak: LibreTranslate's (/translate, /detect, /languages) and OpenAI's
(/v1/chat/completions, /v1/models), over the same Service as /v1/ask."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pipeline.serve.http import (HTTPError, State, check_key, first_event, flag, generation_settings, model_field,
                                 model_request, number, sse, stream_with)
from pipeline.serve.service import LANGUAGE_NAMES, AskRequest, confidence, result_of, until_gone
from pipeline.text.detect import detect_language

FORMATS = ("text", "html")


# ---- LibreTranslate ------------------------------------------------------------------------------

def _texts(fields: dict) -> tuple[list[str], bool]:
    q = fields.get("q")
    if isinstance(q, str):
        return [q], False
    if isinstance(q, list) and q and all(isinstance(item, str) for item in q):
        return q, True
    raise HTTPError(400, "q is missing: send the text to translate as q (a string or a list of strings)")


async def translate(request: Request) -> Response:
    state, fields = await model_request(request)
    texts, many = _texts(fields)
    source = fields.get("source", "auto") or "auto"
    target = fields.get("target")
    if source not in ("auto", *LANGUAGE_NAMES):
        raise HTTPError(400, f"source must be 'auto', 'ja' or 'en', not {source!r}")
    if target not in LANGUAGE_NAMES:
        raise HTTPError(400, f"target must be 'ja' or 'en', not {target!r}")
    if fields.get("format", "text") not in FORMATS:
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
    state, fields = await model_request(request)
    q = fields.get("q")
    if not isinstance(q, str) or not q.strip():
        raise HTTPError(400, "q is missing: send the text whose language to detect")
    lang = detect_language(q)
    return JSONResponse([{"language": lang, "confidence": confidence(q, lang)}])


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
                content = "".join(part.get("text", "") for part in content
                                  if isinstance(part, dict) and part.get("type") == "text")
            if isinstance(content, str):
                return content
            raise HTTPError(400, "the last user message has no text content")
    raise HTTPError(400, "messages has no user message")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def chat_completions(request: Request) -> Response:
    state, fields = await model_request(request)
    question = _question(fields)
    if number(fields, "n", int, 1, 1, 1) != 1:
        raise HTTPError(400, "n must be 1")
    tokens_field = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    ask_request = AskRequest(question=question, model=model_field(fields),
                             settings=generation_settings(fields, tokens_field))
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
    names = state.require_service().models.names
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "bilingual-qa"} for name in names]})


def routes() -> list[Route]:
    return [
        Route("/translate", translate, methods=["POST"]),
        Route("/detect", detect, methods=["POST"]),
        Route("/languages", languages, methods=["GET", "POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
