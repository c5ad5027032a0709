"""APIs that existing clients speak: LibreTranslate's (/translate, /detect, /languages) and OpenAI's
(/v1/chat/completions, /v1/models), over the same Service as /v1/ask."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.serve.http import (HTTPError, State, check_chars, flag, generation_settings, model_field, number, shown,
                                 sse, text_field)
from pipeline.serve.routes import ModelCall, first_event, keyed_route, model_route, open_route
from pipeline.serve.service import LANGUAGE_NAMES, AskRequest, result_of

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


@model_route(forms=True)
async def translate(call: ModelCall) -> Response:
    fields = call.fields
    texts, many = _texts(call.state, fields)
    source = text_field(fields, "source", "auto") or "auto"
    target = text_field(fields, "target")
    if source not in ("auto", *LANGUAGE_NAMES):
        raise HTTPError(400, f"source must be 'auto', 'ja' or 'en', not {shown(source)}")
    if target not in LANGUAGE_NAMES:
        raise HTTPError(400, f"target must be 'ja' or 'en', not {shown(target)}")
    if text_field(fields, "format", "text") not in FORMATS:
        raise HTTPError(400, "format must be 'text' or 'html'")
    beams = number(fields, "beams", int, None, 1, 16)
    out, detected = await call.admit().translate(texts, source, target, beams)
    body = {"translatedText": out if many else out[0]}
    if source == "auto":
        body["detectedLanguage"] = detected if many else detected[0]
    return JSONResponse(body)


@model_route(forms=True)
async def detect(call: ModelCall) -> Response:
    q = call.fields.get("q")
    if not isinstance(q, str) or not q.strip():
        raise HTTPError(400, "q is missing: send the text whose language to detect")
    check_chars(call.state, [q])
    [(language, confidence)] = await call.admit().models.detector.languages([q])
    return JSONResponse([{"language": language, "confidence": confidence}])


@open_route
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


@model_route()
async def chat_completions(call: ModelCall) -> Response:
    fields = call.fields
    question = _question(fields)
    check_chars(call.state, [question])
    if number(fields, "n", int, 1, 1, 1) != 1:
        raise HTTPError(400, "n must be 1")
    tokens_field = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    ask_request = AskRequest(question=question, model=model_field(fields),
                             settings=generation_settings(fields, tokens_field), tokens_field=tokens_field,
                             source_field=None)
    streaming = flag(fields, "stream")
    created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    events = call.admit().ask_events(ask_request)
    first = await first_event(events)
    model, lang, prompt_tokens = first[1]["model"], first[1]["source_lang"], first[1]["prompt_tokens"]
    if not streaming:
        result = await result_of(events)
        content = result["answer_ja"] if lang == "ja" else result["answer_en"]
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": _finish(result["finish_reason"])}],
            "usage": _usage(prompt_tokens, result), "bilingual_qa": result,
        })

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

    return call.stream(first, events, encode, closing=sse(None, "[DONE]"), headers={"Cache-Control": "no-cache"})


def _usage(prompt_tokens: int, result: dict) -> dict:
    completion = result["generated_tokens"]
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


@keyed_route
async def models(request: Request) -> Response:
    state: State = request.app.state.serve
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
