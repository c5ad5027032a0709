"""Run the app under uvicorn: models load on a thread while /health says 503; SIGTERM or Ctrl-C
stops taking connections, lets the requests in flight finish (streams included) for at most
`shutdown_timeout` seconds, cuts the rest (drain.py: a 503 or an `error` event each), stops the
stage threads and exits with code 0 within a second after that.

Connections are bounded in count and time with uvicorn's own settings (`limit_concurrency`,
`timeout_keep_alive`, h11's header size limit) and, where uvicorn has none, with
`GuardedH11Protocol`: a request's head must arrive within `header_timeout` of the connection opening
(or of the previous response), its body within `body_timeout` of its head.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote_plus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.llm.models import resolve_llm
from pipeline.loading import locate_model
from pipeline.qa import model_names
from pipeline.serve.app import ServerConfig, create_app
from pipeline.serve.drain import Draining
from pipeline.serve.models import LoadOptions, ModelRegistry, served_names

log = logging.getLogger("bilingual_qa.serve")
EXIT_GRACE_SECONDS = 0.8  # after the cut: the stage threads' time to stop before the process ends anyway


@dataclass
class ConnectionLimits:
    """Defaults far from what a browser or an SDK does (they send a request's head at once, bodies
    of a few KB, and reuse idle connections within seconds), near enough to free a stalled slot."""
    keep_alive_timeout: float = 15.0
    header_timeout: float = 20.0
    body_timeout: float = 60.0
    max_connections: int = 512
    shutdown_timeout: float = 30.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two deadlines uvicorn lacks: a connection that has not sent a whole
    request head `header_timeout` seconds after it opened or got its last response, or whose body is
    still arriving `body_timeout` seconds after its head, is closed; and one opened beyond
    `max_connections` is closed at once."""

    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        if len(self.connections) > self.limits.max_connections:
            transport.close()
            return
        self._arm(self.limits.header_timeout)

    def handle_events(self) -> None:
        idle = self.conn.their_state is h11.IDLE
        super().handle_events()
        if idle and self.conn.their_state is h11.SEND_BODY:  # a head arrived, its body has not
            self._arm(self.limits.body_timeout)
        elif self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in: the app's time is not the client's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm(self.limits.header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app, if it was reading the body, sees the client gone


class RedactKeys(logging.Filter):
    """Access lines print the query string: a key in it is replaced before the line is written, however
    it is spelled. A parameter is a key when its name, percent-decoded until it stops changing and
    stripped of case and punctuation, is "apikey" (`api_key`, `api%5Fkey`, `%61pi_key`, `API-KEY`),
    or when its value so decoded is the server's key; `&` and `;` both separate parameters."""

    def __init__(self, key: str | None = None):
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redacted(arg) if isinstance(arg, str) and "?" in arg else arg
                                for arg in record.args)
        return True

    def redacted(self, target: str) -> str:
        path, _, query = target.partition("?")
        parts = []
        for separator, parameter in _parameters(query):
            name, equals, value = parameter.partition("=")
            if equals and (_plain(name) == "apikey" or (self.key and _decoded(value) == self.key)):
                value = "REDACTED"
            parts.append(f"{separator}{name}{equals}{value}")
        return f"{path}?{''.join(parts)}"


def _parameters(query: str) -> list[tuple[str, str]]:
    """(separator before it, parameter) for each parameter of a query string."""
    out, start, separator = [], 0, ""
    for index, character in enumerate(query):
        if character in "&;":
            out.append((separator, query[start:index]))
            separator, start = character, index + 1
    out.append((separator, query[start:]))
    return out


def _decoded(text: str) -> str:
    for _ in range(4):  # %2561 -> %61 -> a
        decoded = unquote_plus(text)
        if decoded == text:
            break
        text = decoded
    return text


def _plain(name: str) -> str:
    return "".join(character for character in _decoded(name).lower() if character.isalnum())


def check_models(options: LoadOptions) -> None:
    """A missing model, or two served under one name, fails now, in one line, before the server starts."""
    names = model_names(None, options.ja_en, options.en_ja)
    llms = list(dict.fromkeys(options.llms)) or [model_names()["llm"]]
    for name in llms:
        resolve_llm(name, options.base)  # a checkpoint, or a LoRA adapter and its base, as `ask` takes
    locate_model(names["ja_en"], "--ja-en")
    locate_model(names["en_ja"], "--en-ja")
    served_names(llms, options.served_names)


class ServeServer(uvicorn.Server):
    """uvicorn's server whose shutdown cuts the requests still in flight `grace` seconds after it
    began (drain.py), instead of uvicorn's cancelling them into 500s after its own timeout (kept,
    a little later, as a backstop), then stops the stage threads while its loop still runs (their
    last tokens are handed to it; after it closed, that raised in the stage threads)."""

    def __init__(self, config: uvicorn.Config, draining: Draining, grace: float, stop_stages: Callable[[], None]):
        super().__init__(config)
        self.draining, self.grace, self.stop_stages = draining, grace, stop_stages

    async def shutdown(self, sockets=None) -> None:
        self.draining.cut_after(self.grace)
        await super().shutdown(sockets)
        closing = threading.Thread(target=self.stop_stages, name="close-models", daemon=True)
        closing.start()
        deadline = asyncio.get_running_loop().time() + EXIT_GRACE_SECONDS
        while closing.is_alive() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if closing.is_alive():  # a micro-batch's generate runs to its end: left to the process's end
            log.warning("exiting with the stage threads still running")


def uvicorn_config(app, host: str, port: int, limits: ConnectionLimits, log_level: str,
                   key: str | None = None) -> uvicorn.Config:
    protocol = type("ServeProtocol", (GuardedH11Protocol,), {"limits": limits})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                            timeout_keep_alive=limits.keep_alive_timeout, limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=limits.shutdown_timeout + 0.5)
    logging.getLogger("uvicorn.access").addFilter(RedactKeys(key))  # uvicorn.Config has set up its loggers
    return config


def serve_app(app, host: str, port: int, limits: ConnectionLimits, log_level: str = "info") -> ServeServer:
    """The uvicorn server `bilingual-qa serve` runs `app` with: at shutdown it cuts what is left and
    closes the app's models."""
    config = uvicorn_config(app, host, port, limits, log_level, app.state.serve.config.api_key)
    return ServeServer(config, app.state.draining, limits.shutdown_timeout, lambda: _close(app.state.serve.models))


def run_server(options: LoadOptions, *, host: str = "127.0.0.1", port: int = 8000,
               config: ServerConfig | None = None, limits: ConnectionLimits | None = None,
               log_level: str = "info") -> None:
    check_models(options)
    logging.basicConfig(level=log_level.upper(), format="bilingual-qa: %(message)s")
    config = config or ServerConfig()
    config.bound_host = host
    app = create_app(lambda: ModelRegistry.load(options), config)
    server = serve_app(app, host, port, limits or ConnectionLimits(), log_level)
    # uvicorn drains, then raises the signal again for the handler it found: with this one a SIGTERM
    # ends in a clean exit (code 0) after the models are closed, not in the default handler's kill.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:  # as uvicorn.run: the address was taken, say (uvicorn logged why)
        _close(app.state.serve.models)
        raise SystemExit(3)
    _end_process()


def _close(models: ModelRegistry | None) -> None:
    if models is not None:
        models.close()


def _end_process() -> None:
    """Exit 0 now, without the interpreter's teardown: freeing torch's and transformers' objects one by
    one took seconds after a drained shutdown, and under a thread still inside torch it could abort
    (SIGABRT). Nothing is left to write: the log is flushed here, the translation memory is in-process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
