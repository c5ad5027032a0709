"""The HTTP client of a running `bilingual-qa serve`: its /health, /v1/ask (whole or streamed) and
/translate, with the server's errors turned into ours.

A 400 is the question's or the row's fault, in the words the in-process command would use: it
becomes a BilingualQAError (same line, exit code 2; a batch job writes it to the errors file). Any
other refusal (401 key, 413 size, 503 loading or full) or failure (500), and a server that cannot be
reached or goes away, is a ServerError: one line, and a batch job stops there, resumable.

The standard library's http.client, not httpx: `ask --server` is a process that lives for one
question, and httpx's import and client (its SSL context is made even for http://) cost more than
a tenth of a second of it (benchmarks/cold_start.py). Connections are kept alive in a small pool
shared by a batch job's threads; ssl is imported only for an https:// server.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import select
import threading
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

from pipeline.errors import BilingualQAError, ServerError
from pipeline.text.detect import require_supported

KEY_ENV = "BILINGUAL_QA_API_KEY"
# A connection is refused at once; an answer of 2,000 tokens from a busy server may take minutes.
CONNECT_SECONDS = 10.0
READ_SECONDS = 900.0


def _version() -> str:
    from pipeline import __version__

    return __version__


def check_url(url: str) -> str:
    """The server's base URL without a trailing slash; anything but http(s)://HOST[:PORT] is refused."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ServerError(f"--server {url!r}: give the server's address as http://HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise ServerError(f"--server {url!r}: the port is not a number from 0 to 65535") from None
    return url.strip().rstrip("/")


class _Reply:
    """A whole response: status, reason and body."""

    def __init__(self, status: int, reason: str, body: bytes):
        self.status, self.reason, self.body = status, reason, body

    def json(self):
        return json.loads(self.body)


class ServerClient:
    """A pool of up to `connections` kept-alive connections to the server, shared by the threads of a
    batch job; each request holds one connection until its response is read."""

    def __init__(self, url: str, key: str | None = None, connections: int = 8):
        self.url = check_url(url)
        parts = urlsplit(self.url)
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._prefix = parts.path
        self.headers = {"Accept": "application/json", "User-Agent": f"bilingual-qa/{_version()}"}
        key = key if key is not None else os.environ.get(KEY_ENV)
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(connections)
        self._ssl = None

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def health(self) -> dict:
        """The server's /health once its models are loaded (its batch size included)."""
        return self._send("GET", "/health")

    def models(self) -> list[dict]:
        """/v1/models' entries: each model's `id`, and an adapter's `base`."""
        return self._send("GET", "/v1/models")["data"]

    def ask(self, fields: dict) -> dict:
        """/v1/ask: the object of `ask --format json`."""
        return self._send("POST", "/v1/ask", fields)

    def ask_events(self, fields: dict) -> Iterator[tuple[str, dict]]:
        """/v1/ask with stream: (event, data) as the server sends them; an `error` event raises."""
        with self._exchange("POST", "/v1/ask", {**fields, "stream": True}) as response:
            if response.status != 200:
                self._raise_for(_Reply(response.status, response.reason, self._read(response)), "/v1/ask")
            for event, data in _server_sent_events(self._lines(response)):
                if event == "error":
                    raise BilingualQAError(data.get("error", "the server's answer failed"))
                yield event, data

    def translate(self, texts: list[str], source: str, target: str, beams: int | None = None) -> list[str]:
        """LibreTranslate's /translate for texts of a known language (`source`), in order."""
        body = {"q": texts, "source": source, "target": target, "format": "text"}
        if beams is not None:
            body["beams"] = beams
        translated = self._send("POST", "/translate", body)["translatedText"]
        if not isinstance(translated, list) or len(translated) != len(texts):
            raise ServerError(f"the server at {self.url} sent {len(translated)} translations for {len(texts)} texts")
        return translated

    # ---- the exchange ------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._exchange(method, path, body) as response:
            reply = _Reply(response.status, response.reason, self._read(response))
        if reply.status != 200:
            self._raise_for(reply, path)
        try:
            return reply.json()
        except ValueError:
            raise ServerError(f"the server at {self.url} sent no JSON for {path}: is it bilingual-qa serve?") from None

    @contextmanager
    def _exchange(self, method: str, path: str, body: dict | None):
        """A connection from the pool with the request sent and its response's head read; the
        connection goes back to the pool if the response was read to its end, else it is closed."""
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        headers = dict(self.headers, **({"Content-Type": "application/json"} if payload is not None else {}))
        with self._slots:
            connection = self._take()
            try:
                if connection.sock is None:  # a new connection: CONNECT_SECONDS to connect, then READ_SECONDS
                    connection.connect()
                    connection.sock.settimeout(READ_SECONDS)
                connection.request(method, self._prefix + path, body=payload, headers=headers)
                response = connection.getresponse()
                yield response
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise self._unreachable(error) from None
            except BaseException:
                connection.close()
                raise
            if response.isclosed() and not response.will_close:
                self._idle.put(connection)
            else:
                connection.close()

    def _read(self, response) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as error:
            raise self._unreachable(error) from None

    def _lines(self, response) -> Iterator[str]:
        try:
            while line := response.readline():
                yield line.decode("utf-8").rstrip("\r\n")
        except (OSError, http.client.HTTPException) as error:
            raise self._unreachable(error) from None

    def _take(self) -> http.client.HTTPConnection:
        """A kept-alive connection the server has not closed meanwhile, or a new one."""
        while True:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                break
            readable, _, _ = select.select([connection.sock], [], [], 0)
            if not readable:  # nothing to read on an idle connection: the server has not closed it
                return connection
            connection.close()
        if self._https:
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=CONNECT_SECONDS, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_SECONDS)

    def _raise_for(self, reply: _Reply, path: str):
        try:
            body = reply.json()
            message = body.get("error") or reply.reason
        except (ValueError, AttributeError):
            body = {}
            message = reply.body.decode("utf-8", "replace").strip()[:200] or reply.reason
        message = " ".join(str(message).split())
        status = reply.status
        if status == 400:
            if body.get("code") == "unsupported_language" and isinstance(body.get("language"), str):
                require_supported(body["language"])  # the in-process command's own words (its options)
            raise BilingualQAError(message)
        if status == 404:
            raise ServerError(f"{self.url} has no {path}: is it bilingual-qa serve?")
        if status < 500 or status == 503:
            raise ServerError(f"the server at {self.url} refused the request ({status}): {message}")
        raise ServerError(f"the server at {self.url} failed ({status}): {message}", exit_code=1)

    def _unreachable(self, error: Exception) -> ServerError:
        if isinstance(error, TimeoutError):
            return ServerError(f"the server at {self.url} did not answer in time ({type(error).__name__})")
        reason = " ".join(str(error).split()) or type(error).__name__
        return ServerError(f"cannot reach the server at {self.url}: {reason}")


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, JSON data) of a text/event-stream body (an event without a name is "message")."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, json.loads("\n".join(data))
