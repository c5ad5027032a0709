"""What the server's routes share (app.py's own and compat.py's LibreTranslate/OpenAI ones): its
state, admission, typed fields and server-sent events. Reading a request (key, body) is bodies.py;
what every model route goes through, in one place, is routes.py."""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.serve.metrics import Metrics
from pipeline.serve.models import ModelRegistry
from pipeline.serve.service import Service
from pipeline.spec import MAX_SEED, GenerationSettings

log = logging.getLogger("bilingual_qa.serve")
DEFAULT_MAX_BODY = 1_000_000
DEFAULT_MAX_QUEUE = 256
# LibreTranslate's two limits (its --char-limit and --batch-limit): characters of text in one request,
# and texts in one /translate request. Far above what a person sends; a 100 KB document passes.
DEFAULT_CHAR_LIMIT = 200_000
DEFAULT_BATCH_LIMIT = 128
MAX_NUMBER_CHARS = 40  # a number sent as text: a 128-bit integer has 39 digits
PARSE_THREADS = 2  # bodies that take a while to parse, at most this many at once


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
        self.parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="parse-body")

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


# ---- typed fields ------------------------------------------------------------------------------

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
        if isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
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
        seed=number(fields, "seed", int, None, 0, MAX_SEED),  # GenerationSettings' range, in its words
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


def model_field(fields: dict) -> str | None:
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise HTTPError(400, "model must be a string")
    return model


