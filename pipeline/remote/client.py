"""The HTTP client of a running `bilingual-qa serve`: its /health, /v1/ask (whole or streamed) and
/translate, with the server's errors turned into ours.

A 400 is the question's or the row's fault, in the words the in-process command would use: it
becomes a BilingualQAError (same line, exit code 2; a batch job writes it to the errors file). Any
other refusal (401 key, 413 size, 503 loading or full) or failure (500), and a server that cannot be
reached or goes away, is a ServerError: one line, and a batch job stops there, resumable.
httpx is imported only here, and this module only by `--server` paths (never for --help).
"""

from __future__ import annotations

import json
import os
from typing import Iterator
from urllib.parse import urlsplit

import httpx

from pipeline.errors import BilingualQAError, ServerError
from pipeline.text.detect import require_supported

SERVER_ENV = "BILINGUAL_QA_SERVER"
KEY_ENV = "BILINGUAL_QA_API_KEY"
# A connection is refused at once; an answer of 2,000 tokens from a busy server may take minutes.
TIMEOUT = httpx.Timeout(connect=10.0, read=900.0, write=60.0, pool=900.0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bilingual-qa")
    except PackageNotFoundError:
        return "unknown"


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


class ServerClient:
    """One connection pool to the server, shared by the threads of a batch job (httpx.Client is
    thread-safe); `connections` bounds the requests in flight."""

    def __init__(self, url: str, key: str | None = None, connections: int = 8):
        self.url = check_url(url)
        headers = {"Accept": "application/json", "User-Agent": f"bilingual-qa/{_version()}"}
        key = key if key is not None else os.environ.get(KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT, limits=limits)

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict:
        """The server's /health once its models are loaded (its batch size included)."""
        return self._send("GET", "/health")

    def ask(self, fields: dict) -> dict:
        """/v1/ask: the object of `ask --format json`."""
        return self._send("POST", "/v1/ask", fields)

    def ask_events(self, fields: dict) -> Iterator[tuple[str, dict]]:
        """/v1/ask with stream: (event, data) as the server sends them; an `error` event raises."""
        try:
            with self.http.stream("POST", "/v1/ask", json={**fields, "stream": True}) as response:
                if response.status_code != 200:
                    response.read()
                    self._raise_for(response)
                for event, data in _server_sent_events(response.iter_lines()):
                    if event == "error":
                        raise BilingualQAError(data.get("error", "the server's answer failed"))
                    yield event, data
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None

    def translate(self, texts: list[str], source: str, target: str, beams: int | None = None) -> list[str]:
        """LibreTranslate's /translate for texts of a known language (`source`), in order."""
        body = {"q": texts, "source": source, "target": target, "format": "text"}
        if beams is not None:
            body["beams"] = beams
        translated = self._send("POST", "/translate", body)["translatedText"]
        if not isinstance(translated, list) or len(translated) != len(texts):
            raise ServerError(f"the server at {self.url} sent {len(translated)} translations for {len(texts)} texts")
        return translated

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        if response.status_code != 200:
            self._raise_for(response)
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"the server at {self.url} sent no JSON for {path}: is it bilingual-qa serve?") from None

    def _raise_for(self, response: httpx.Response):
        try:
            body = response.json()
            message = body.get("error") or response.reason_phrase
        except (ValueError, AttributeError):
            body, message = {}, response.text.strip()[:200] or response.reason_phrase
        message = " ".join(str(message).split())
        status = response.status_code
        if status == 400:
            if body.get("code") == "unsupported_language" and isinstance(body.get("language"), str):
                require_supported(body["language"])  # the in-process command's own words (its options)
            raise BilingualQAError(message)
        if status == 404:
            raise ServerError(f"{self.url} has no {response.request.url.path}: is it bilingual-qa serve?")
        if status < 500 or status == 503:
            raise ServerError(f"the server at {self.url} refused the request ({status}): {message}")
        raise ServerError(f"the server at {self.url} failed ({status}): {message}", exit_code=1)

    def _unreachable(self, error: httpx.HTTPError) -> ServerError:
        if isinstance(error, httpx.TimeoutException):
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
