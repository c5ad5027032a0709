"""What the server's routes share (app.py's own and compat.py's LibreTranslate/OpenAI ones): its
state, admission, keys, reading fields from any body, typed fields and server-sent events."""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs

from starlette.requests import Request

from pipeline.errors import BilingualQAError
from pipeline.llm.engine import GenerationSettings
from pipeline.serve.metrics import Metrics
from pipeline.serve.models import ModelRegistry
from pipeline.serve.service import Service

log = logging.getLogger("bilingual_qa.serve")
DEFAULT_MAX_BODY = 1_000_000
DEFAULT_MAX_QUEUE = 256
OPEN_PATHS = {"/", "/health", "/languages"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_queue: int = DEFAULT_MAX_QUEUE


class State:
    """What the routes share: the models once loaded, the service over them, metrics, limits."""

    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.models: ModelRegistry | None = None
        self.service: Service | None = None
        self.load_error: str | None = None
        self.in_flight = 0

    def ready(self, models: ModelRegistry) -> None:
        self.metrics.watch_batches(models.schedulers)
        for scheduler in models.schedulers.values():
            scheduler.on_tokens = self.metrics.tokens.inc
        self.service = Service(models, observe=self.metrics.observe)
        self.models = models

    def require_service(self) -> Service:
        if self.service is None:
            raise HTTPError(503, self.load_error or "the models are still loading", {"Retry-After": "5"})
        return self.service

    def admit(self) -> "_Admission":
        if self.in_flight >= self.config.max_queue:
            raise HTTPError(503, f"the queue is full ({self.config.max_queue} requests); try again shortly",
                            {"Retry-After": "1"})
        return _Admission(self)


class _Admission:
    """Counts a model request from admission until its response (streamed ones included) ends."""

    def __init__(self, state: State):
        self.state = state
        self.done = False
        state.in_flight += 1
        state.metrics.queue_depth.set(state.in_flight)

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.state.in_flight -= 1
            self.state.metrics.queue_depth.set(self.state.in_flight)


# ---- request reading ---------------------------------------------------------------------------

async def read_fields(request: Request, state: State) -> dict:
    """The body as a dict, from JSON, form-encoded or multipart (as LibreTranslate accepts)."""
    limit = state.config.max_body
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the body is {declared} bytes; the limit is {limit}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"the body is over the limit of {limit} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body.strip():
        return {}
    if kind == "application/x-www-form-urlencoded":
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise HTTPError(400, "the form body is not valid UTF-8") from None
        return {key: values[0] if len(values) == 1 else values for key, values in parsed.items()}
    if kind == "multipart/form-data":
        request._body = body  # the stream is spent; Starlette's form parser reads the cached body
        form = await request.form()
        return {key: value for key, value in form.items() if isinstance(value, str)}
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTTPError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return fields


def check_key(request: Request, state: State, fields: dict | None) -> None:
    """A bearer token, or LibreTranslate's `api_key` field (body or query)."""
    key = state.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else None
    if given is None and fields is not None and isinstance(fields.get("api_key"), str):
        given = fields["api_key"]
    given = given if given is not None else request.query_params.get("api_key")
    if given is None:
        raise HTTPError(401, "an API key is needed: send 'Authorization: Bearer KEY' or an api_key field")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPError(401, "the API key is wrong")


async def model_request(request: Request) -> tuple[State, dict]:
    """Body read and key checked for an endpoint that runs models (the key before any body error)."""
    state: State = request.app.state.serve
    has_bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
    try:
        fields = await read_fields(request, state)
    except HTTPError as error:
        if error.status == 400 and state.config.api_key is not None and not has_bearer:
            raise HTTPError(401, "an API key is needed: send 'Authorization: Bearer KEY' or an api_key field")
        raise
    check_key(request, state, fields)
    return state, fields


def number(fields: dict, name: str, kind, default, low=None, high=None, low_open=False):
    """An option from the body, converted and range-checked (form values arrive as text)."""
    value = fields.get(name)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        converted = kind(value)
        if kind is int and isinstance(value, float) and value != converted:
            raise ValueError
    except (TypeError, ValueError):
        raise HTTPError(400, f"{name} must be {'an integer' if kind is int else 'a number'}") from None
    if (low is not None and (converted <= low if low_open else converted < low)) or (high is not None and converted > high):
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise HTTPError(400, f"{name} must be in {span}, not {value}")
    return converted


def flag(fields: dict, name: str) -> bool:
    value = fields.get(name, False)
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")  # form bodies carry flags as text
    if not isinstance(value, bool):
        raise HTTPError(400, f"{name} must be true or false")
    return value


def generation_settings(fields: dict, tokens_field: str = "max_new_tokens") -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=number(fields, tokens_field, int, 256, 1, 2000),
        temperature=number(fields, "temperature", float, 0.0, 0.0, 5.0),
        top_p=number(fields, "top_p", float, 1.0, 0.0, 1.0, low_open=True),
        seed=number(fields, "seed", int, None),
    )


def source_language(value) -> str | None:
    if value in (None, "", "auto"):
        return None
    if value not in ("ja", "en"):
        raise HTTPError(400, f"source_lang must be 'auto', 'ja' or 'en', not {value!r}")
    return value


def sse(event: str | None, data) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {payload}\n\n".encode()


async def stream_with(admission: _Admission, first, events, encode: Callable, closing: bytes = b""):
    """A streamed body: the event already read, the rest, then `closing`; an error becomes an event."""
    try:
        yield encode(*first)
        async for event in events:
            yield encode(*event)
        if closing:
            yield closing
    except Exception as error:  # noqa: BLE001 - the headers are sent: report in the stream, log the rest
        if not isinstance(error, BilingualQAError):
            log.exception("a streamed request failed")
        yield sse("error", {"error": str(error) if isinstance(error, BilingualQAError) else "internal server error"})
    finally:
        await events.aclose()
        admission.release()


async def first_event(events):
    """Run the pipeline to its first event, so bad input is still an HTTP error, not a stream."""
    try:
        return await events.__anext__()
    except BaseException:
        await events.aclose()
        raise


# ---- routes --------------------------------------------------------------------------------------

def model_field(fields: dict) -> str | None:
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise HTTPError(400, "model must be a string")
    return model


