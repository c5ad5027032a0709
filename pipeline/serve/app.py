"""The HTTP server: Starlette routes over `Service`, with keys, limits, errors and metrics.

Every error is `{"error": "..."}`: 400 bad input, 401 missing or wrong key, 413 body over the limit,
503 with Retry-After while the models load or the queue is full, 500 without a traceback (logged).
"""

from __future__ import annotations

import threading
from importlib import resources
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.errors import (BilingualQAError, ControlCharacterError, EmptyInputError, InputTooLongError,
                             UnsupportedLanguageError)
from pipeline.serve.batching import StageStopped
from pipeline.serve.drain import Drain, Draining
from pipeline.serve.guard import SiteGuard
from pipeline.serve.http import (HTTPError, ServerConfig, State, check_chars, flag, generation_settings, log,
                                 model_field, number, source_language, sse)
from pipeline.serve.metrics import Metrics
from pipeline.serve.models import ModelRegistry, UnknownModelError
from pipeline.serve.routes import ModelCall, first_event, keyed_route, model_route, open_route
from pipeline.serve.service import AskRequest

__all__ = ["ServerConfig", "create_app"]


@open_route
async def page(request: Request) -> Response:
    return HTMLResponse(resources.files("pipeline.serve").joinpath("page/index.html").read_text("utf-8"))


@open_route
async def favicon(request: Request) -> Response:
    # Served, so that a browser's request for it on every load is no 404 (and no error counted).
    icon = resources.files("pipeline.serve").joinpath("page/favicon.svg").read_bytes()
    return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


@open_route
async def health(request: Request) -> Response:
    state: State = request.app.state.serve
    if state.service is None:
        body = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    if reason := state.stopped():
        return JSONResponse({"status": "error", "error": reason}, status_code=503)
    # max_batch: the questions the server decodes together, the default --concurrency of a client's batch job
    return JSONResponse({"status": "ok", "max_batch": state.models.max_rows})


@model_route()
async def ask(call: ModelCall) -> Response:
    fields = call.fields
    question = fields.get("question")
    if not isinstance(question, str):
        raise HTTPError(400, "question is missing: send {\"question\": \"...\"}")
    check_chars(call.state, [question])
    ask_request = AskRequest(question=question, source_lang=source_language(fields.get("source_lang")),
                             model=model_field(fields), settings=generation_settings(fields),
                             beams=number(fields, "beams", int, None, 1, 16), raw=flag(fields, "raw"))
    streaming = flag(fields, "stream")
    service = call.admit()
    if not streaming:
        return JSONResponse(await service.ask(ask_request))
    events = service.ask_events(ask_request)
    return call.stream(await first_event(events), events, sse)


@keyed_route
async def metrics(request: Request) -> Response:
    state: State = request.app.state.serve
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


# ---- the application -----------------------------------------------------------------------------

async def _http_error(request: Request, error: HTTPError) -> Response:
    if error.status == 499:  # the client hung up: nobody reads this, and it is nobody's fault here
        return Response(status_code=499)
    return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)


async def _starlette_error(request: Request, error: HTTPException) -> Response:
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


# Beside the message, a code a client can word its own way (the page does); UnsupportedLanguageError
# also gives the language it saw.
ERROR_CODES = {UnsupportedLanguageError: "unsupported_language", InputTooLongError: "too_long",
               ControlCharacterError: "control_character", EmptyInputError: "empty",
               UnknownModelError: "unknown_model"}


async def _user_error(request: Request, error: Exception) -> Response:
    body = {"error": str(error)}
    code = next((code for kind, code in ERROR_CODES.items() if isinstance(error, kind)), None)
    if code:
        body["code"] = code
    if getattr(error, "language", None):
        body["language"] = error.language
    return JSONResponse(body, status_code=400)


async def _stage_stopped(request: Request, error: StageStopped) -> Response:
    return JSONResponse({"error": f"{error}; {error.hint}"}, status_code=503)


async def _server_error(request: Request, error: Exception) -> Response:
    log.error("request %s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse({"error": "internal server error"}, status_code=500)


class _CountRequests:
    """ASGI middleware: every response counted by route and status code."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else "other"
        status = {}

        async def remember(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.count(endpoint, message["status"])
            await send(message)
        try:
            await self.app(scope, receive, remember)
        except Exception:
            if "code" not in status:
                self.metrics.count(endpoint, 500)
            raise


def create_app(load: ModelRegistry | Callable[[], ModelRegistry], config: ServerConfig | None = None) -> Starlette:
    """The app over loaded models, or over a loader run on a thread at start-up (/health says 503
    until it is done)."""
    from contextlib import asynccontextmanager

    from pipeline.serve import compat

    metrics_ = Metrics()
    state = State(config or ServerConfig(), metrics_)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/favicon.svg", favicon, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/ask", ask, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        *compat.routes(),
    ]

    def run_loader():
        try:
            state.ready(load() if callable(load) else load)
        except BilingualQAError as error:  # the message names paths: the log has it, /health does not
            state.load_error = "loading the models failed (see the server log)"
            log.error("loading the models failed: %s", error)
        except Exception as error:  # noqa: BLE001
            state.load_error = "loading the models failed (see the server log)"
            log.exception("loading the models failed: %s", error)

    @asynccontextmanager
    async def lifespan(app):
        if isinstance(load, ModelRegistry):
            run_loader()
        else:
            threading.Thread(target=run_loader, name="load-models", daemon=True).start()
        yield  # the models outlive the app: whoever runs it closes them (server.py), once requests drained
        state.parse_pool.shutdown(wait=False, cancel_futures=True)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPError: _http_error, HTTPException: _starlette_error, BilingualQAError: _user_error,
        UnknownModelError: _user_error, StageStopped: _stage_stopped, Exception: _server_error,
    })
    app.router.redirect_slashes = False  # its redirect's Location would be built from the Host header
    app.state.serve = state
    if state.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(state.config.cors_origins), max_age=600,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["authorization", "content-type"])
    app.add_middleware(SiteGuard, config=state.config)
    app.state.draining = Draining()  # cut at --shutdown-timeout after SIGTERM (server.py)
    app.add_middleware(Drain, draining=app.state.draining)
    app.add_middleware(_CountRequests, metrics=metrics_, paths={route.path for route in routes})
    return app
