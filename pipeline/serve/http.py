"""What the server's routes share (app.py's own and compat.py's LibreTranslate/OpenAI ones): its
state, admission, keys, reading fields from any body, typed fields and server-sent events."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from pipeline.errors import BilingualQAError
from pipeline.spec import GenerationSettings
from pipeline.serve.metrics import Metrics
from pipeline.serve.models import ModelRegistry
from pipeline.serve.service import Service

log = logging.getLogger("bilingual_qa.serve")
DEFAULT_MAX_BODY = 1_000_000
DEFAULT_MAX_QUEUE = 256
# LibreTranslate's two limits (its --char-limit and --batch-limit): characters of text in one request,
# and texts in one /translate request. Far above what a person sends; a 100 KB document passes.
DEFAULT_CHAR_LIMIT = 200_000
DEFAULT_BATCH_LIMIT = 128
DISCARD_LIMIT = 16 * 2**20  # an over-long body is read (and dropped) up to this, so the client sees the 413
MAX_DEPTH = 32  # JSON nesting: the APIs need 4 (messages -> message -> content -> part)
MAX_INT_DIGITS = 40  # a 128-bit integer has 39
OPEN_PATHS = {"/", "/health", "/languages"}
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    char_limit: int = DEFAULT_CHAR_LIMIT
    batch_limit: int = DEFAULT_BATCH_LIMIT
    bound_host: str | None = None  # the address listened on: a Host header may name it
    allowed_hosts: tuple[str, ...] = ()  # more names a Host header may carry (no key set)
    cors_origins: tuple[str, ...] = ()  # other sites' pages allowed to call the API ("*": any)

    def __post_init__(self):
        # A blank key is no key: it must not pass for one (h11 strips header values anyway).
        self.api_key = self.api_key.strip() or None if self.api_key is not None else None


def shown(value, limit: int = 60) -> str:
    """A client's value quoted in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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

    def stopped(self) -> str | None:
        """Why the server cannot answer although its models loaded: a stage thread has stopped."""
        stages = self.models.stopped_stages() if self.models is not None else []
        return f"the {', '.join(stages)} stage stopped (see the server log); restart the server" if stages else None

    def admit(self) -> "_Admission":
        if reason := self.stopped():
            raise HTTPError(503, reason)
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

async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 once it passes `limit`: the rest is read and dropped (up to DISCARD_LIMIT) so
    that a client which sends the whole body before reading, as urllib, requests and httpx do, reads
    the 413 instead of a reset connection; then the connection is closed."""
    close = {"Connection": "close"}
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit and (
            int(declared) > DISCARD_LIMIT or request.headers.get("expect", "").lower() == "100-continue"):
        raise HTTPError(413, f"the body is {declared} bytes; the limit is {limit}", close)  # nothing sent yet
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DISCARD_LIMIT:
                break
    except ClientDisconnect:
        raise HTTPError(499, "the client closed the connection") from None
    if size > limit:
        raise HTTPError(413, f"the body is over the limit of {limit} bytes", close)
    return b"".join(chunks)


async def read_fields(request: Request, state: State, forms: bool = False) -> dict:
    """The body as a dict: JSON from application/json only (so no other site's page can send it in a
    plain form); form-encoded and multipart bodies too where `forms` (the LibreTranslate endpoints)."""
    body = await read_body(request, state.config.max_body)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body.strip():
        return {}
    if forms and kind in FORM_TYPES:
        return await _form_fields(request, body, kind)
    if kind != "application/json":
        accepted = "application/json, application/x-www-form-urlencoded or multipart/form-data" if forms \
            else "application/json"
        raise HTTPError(415, f"send the body as {accepted} (Content-Type), not {shown(kind or 'none')}")
    try:
        fields = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_short_int)
    except RecursionError:
        raise HTTPError(400, f"the body is not valid JSON (nested deeper than {MAX_DEPTH})") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, and the parse hooks' refusals
        raise HTTPError(400, f"the body is not valid JSON ({str(error)[:120]})") from None
    if not isinstance(fields, dict):
        raise HTTPError(400, "the body must be a JSON object")
    _check_values(fields)
    return fields


async def _form_fields(request: Request, body: bytes, kind: str) -> dict:
    """A form's fields, a field sent twice as a list (so that a string field refuses it)."""
    pairs: list[tuple[str, str]] = []
    if kind == "multipart/form-data":
        request._body = body  # the stream is spent; Starlette's form parser reads the cached body
        try:
            form = await request.form(max_files=0, max_fields=1000)
        except (HTTPException, ValueError) as error:
            raise HTTPError(400, f"the multipart body cannot be read ({getattr(error, 'detail', error)})") from None
        pairs = [(key, value) for key, value in form.multi_items() if isinstance(value, str)]
    else:
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000)
        except UnicodeDecodeError:
            raise HTTPError(400, "the form body is not valid UTF-8") from None
        except ValueError:
            raise HTTPError(400, "the form has more than 1000 fields") from None
    fields: dict = {}
    for key, value in pairs:
        fields[key] = [*fields[key], value] if isinstance(fields.get(key), list) else \
            [fields[key], value] if key in fields else value
    _check_values(fields)
    return fields


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large a number")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is too long")
    return int(text)


def _check_values(fields: dict) -> None:
    """Every string valid Unicode (a lone surrogate cannot be encoded again) and no deep nesting."""
    todo = [(fields, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise HTTPError(400, f"the body is nested deeper than {MAX_DEPTH}")
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str) and _SURROGATE.search(text):
                    raise HTTPError(400, f"{shown(key) if isinstance(key, str) else 'a value'} holds a lone"
                                         " surrogate (\\ud800-\\udfff): send valid Unicode text")
            if isinstance(item, (dict, list)):
                todo.append((item, depth + 1))


def check_key(request: Request, state: State, fields: dict | None) -> None:
    """A bearer token, or LibreTranslate's `api_key` field (body or query), compared in constant time."""
    key = state.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else None
    if not given and fields is not None and isinstance(fields.get("api_key"), str):
        given = fields["api_key"]
    given = given or request.query_params.get("api_key")
    if not given or not given.strip():
        raise HTTPError(401, "an API key is needed: send 'Authorization: Bearer KEY' or an api_key field")
    if not hmac.compare_digest(_digest(given), _digest(key)):  # digests: equal length, no timing by length
        raise HTTPError(401, "the API key is wrong")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


async def model_request(request: Request, forms: bool = False) -> tuple[State, dict]:
    """Body read and key checked for an endpoint that runs models (the key before any body error)."""
    state: State = request.app.state.serve
    has_bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
    try:
        fields = await read_fields(request, state, forms)
    except HTTPError as error:
        if error.status in (400, 415) and state.config.api_key is not None and not has_bearer:
            raise HTTPError(401, "an API key is needed: send 'Authorization: Bearer KEY' or an api_key field")
        raise
    check_key(request, state, fields)
    return state, fields


def text_field(fields: dict, name: str, default: str | None = None) -> str | None:
    """A field that must be a string (a form that sends it twice gives a list: refused)."""
    value = fields.get(name, default)
    if value is not None and not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a string")
    return value


def check_chars(state: State, texts: list[str]) -> None:
    """LibreTranslate's char_limit: the characters of text one request may carry."""
    total = sum(len(text) for text in texts)
    if total > state.config.char_limit:
        raise HTTPError(400, f"the request has {total} characters of text; this server's char_limit is"
                             f" {state.config.char_limit}")


def number(fields: dict, name: str, kind, default, low=None, high=None, low_open=False):
    """An option from the body, converted and range-checked (form values arrive as text)."""
    value = fields.get(name)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if isinstance(value, str) and len(value) > MAX_INT_DIGITS:
            raise ValueError
        converted = kind(value)
        if kind is int and isinstance(value, float) and value != converted:
            raise ValueError
        if kind is float and not math.isfinite(converted):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise HTTPError(400, f"{name} must be {'an integer' if kind is int else 'a number'}") from None
    if (low is not None and (converted <= low if low_open else converted < low)) or (high is not None and converted > high):
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise HTTPError(400, f"{name} must be in {span}, not {shown(value)}")
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
        seed=number(fields, "seed", int, None, -2**63, 2**63 - 1),
    )


def source_language(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise HTTPError(400, "source_lang must be a string")
    if value in (None, "", "auto"):
        return None
    if value not in ("ja", "en"):
        raise HTTPError(400, f"source_lang must be 'auto', 'ja' or 'en', not {shown(value)}")
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


