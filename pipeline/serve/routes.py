"""What every route goes through, declared once per route (as LibreTranslate's `@access_check` and
vLLM's `@with_cancellation` / `@load_aware_call` do), so a new route cannot forget a step:

- `model_route`: a route that runs models. The key is checked on the headers before any body byte
  is read (bodies.py), the body read and parsed, the handler run; the handler gets the service only
  through `ModelCall.admit`, which counts it in `--max-queue` (503 while loading, stopped or full)
  until its response, streamed or whole, has ended. When the caller goes, the handler is cancelled
  (its answer row, translation rounds and queued plans are dropped) and the response is a 499.
- `keyed_route`: a route that needs the key and nothing else (/metrics, /v1/models).
- `open_route`: a route anybody may call (the page, /health, /languages).

`Host` and `Origin` are checked before any route (guard.py); tests/serve/test_routes.py checks that
every route of the app is one of these three.
"""

from __future__ import annotations

import functools
from typing import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pipeline.errors import BilingualQAError
from pipeline.serve.bodies import check_body_key, check_header_key, read_fields
from pipeline.serve.http import HTTPError, State, log, sse
from pipeline.serve.service import Service, until_gone

MODEL, KEYED, OPEN = "model", "keyed", "open"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ModelCall:
    """One request to a model route: its fields, and the service once admitted."""

    def __init__(self, request: Request, state: State, fields: dict):
        self.request = request
        self.state = state
        self.fields = fields
        self._admission = None
        self._service: Service | None = None
        self.streaming = False

    def admit(self) -> Service:
        """The service, this request counted in --max-queue until its response ends (a 503 while the
        models load, a stage has stopped or the queue is full)."""
        self._service = self.state.require_service()
        self._admission = self.state.admit()
        return self._service

    def release(self) -> None:
        if self._admission is not None:
            self._admission.release()

    def stream(self, first, events: AsyncIterator, encode: Callable, closing: bytes = b"",
               headers: dict | None = None) -> StreamingResponse:
        """A server-sent event stream of `first` and the rest of `events`, each through `encode`; the
        admission is released, and `events` closed, when it ends however it ends."""
        self.streaming = True
        return _AdmittedStream(self, events, _streamed(first, events, encode, closing), headers or SSE_HEADERS)


class _AdmittedStream(StreamingResponse):
    def __init__(self, call: ModelCall, events: AsyncIterator, body: AsyncIterator[bytes], headers: dict):
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.call, self.events = call, events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when the caller went, or the stream never began: its answer row is freed
            await self.events.aclose()
            self.call.release()


async def _streamed(first, events: AsyncIterator, encode: Callable, closing: bytes) -> AsyncIterator[bytes]:
    """The event already read, the rest, then `closing`; a failure becomes an `error` event."""
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


async def first_event(events: AsyncIterator):
    """Run the pipeline to its first event, so bad input is still an HTTP error, not a stream."""
    try:
        return await events.__anext__()
    except BaseException:
        await events.aclose()
        raise


def model_route(*, forms: bool = False):
    """A route that runs models (see the module docstring). `forms`: LibreTranslate's, which also
    takes form bodies and the key as an `api_key` field."""
    def wrap(handler: Callable[[ModelCall], Awaitable[Response]]):
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            state: State = request.app.state.serve
            call = ModelCall(request, state, await _authorized_fields(request, state, forms))
            try:
                response = await until_gone(handler(call), request.is_disconnected)
            except BaseException:
                call.release()
                raise
            if response is None:  # the caller went: its work was cancelled, and nobody reads this
                call.release()
                return Response(status_code=499)
            if not call.streaming:
                call.release()
            return response
        endpoint.access = MODEL
        return endpoint
    return wrap


async def _authorized_fields(request: Request, state: State, forms: bool) -> dict:
    """The body's fields, the key checked first: on the headers, or in the body where the route
    takes it there (a body that cannot be read then is a 401 too: a wrong key learns nothing)."""
    key_in_body = check_header_key(request, state, body_key=forms)
    try:
        fields = await read_fields(request, state, forms, key_in_body)
    except HTTPError as error:
        if key_in_body and error.status in (400, 415):
            raise HTTPError(401, "an API key is needed: send 'Authorization: Bearer KEY' or an api_key field") from None
        raise
    if key_in_body:
        check_body_key(fields, state)
    return fields


def keyed_route(handler: Callable[[Request], Awaitable[Response]]):
    """A route that needs the key (bearer token or query), and no model."""
    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        check_header_key(request, request.app.state.serve, body_key=False)
        return await handler(request)
    endpoint.access = KEYED
    return endpoint


def open_route(handler: Callable[[Request], Awaitable[Response]]):
    """A route anybody may call: no key, no model."""
    handler.access = OPEN
    return handler
