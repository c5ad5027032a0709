"""Shutting down on time. After SIGTERM the server stops taking connections and lets the requests in
flight finish; `--shutdown-timeout` seconds later (server.py calls `Draining.cut_after`) every request
still running is cut here: one that has not answered yet gets a 503 with Retry-After, a stream gets
an `error` event and its end, and each cut is one line in the log. uvicorn, left to its own
timeout, would cancel them into a 500 and a traceback each, and the process would linger.
"""

from __future__ import annotations

import asyncio
import json
import time

from pipeline.serve.http import log

SHUTTING_DOWN = "the server is shutting down; try again shortly"
RETRY_AFTER = "5"  # a restarted server loads its models first (/health says 503 meanwhile)


class Draining:
    """The request tasks in flight, and whether they are being cut."""

    def __init__(self):
        self.tasks: set[asyncio.Task] = set()
        self.cutting = False

    def cut_after(self, seconds: float) -> None:
        """Cut every request still in flight `seconds` from now (called on the server's loop)."""
        asyncio.get_running_loop().call_later(seconds, self.cut)

    def cut(self) -> None:
        self.cutting = True
        for task in list(self.tasks):
            task.cancel()


class Drain:
    """ASGI middleware: each HTTP request's task is known to `draining`, and answered as above when cut."""

    def __init__(self, app, draining: Draining):
        self.app = app
        self.draining = draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        progress = {"started": False, "ended": False, "events": False, "since": time.monotonic()}

        async def tracking(message) -> None:
            if message["type"] == "http.response.start":
                progress["started"] = True
                progress["events"] = dict(message.get("headers", [])).get(b"content-type", b"").startswith(
                    b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                progress["ended"] = True
            await send(message)

        task = asyncio.current_task()
        self.draining.tasks.add(task)
        try:
            if self.draining.cutting:  # came in after the cut: no work begins now
                raise asyncio.CancelledError
            await self.app(scope, receive, tracking)
        except asyncio.CancelledError:
            if not self.draining.cutting:
                raise
            await _answer_cut(scope, send, progress)
        finally:
            self.draining.tasks.discard(task)


async def _answer_cut(scope, send, progress: dict) -> None:
    if progress["ended"]:
        return
    seconds = time.monotonic() - progress["since"]
    if not progress["started"]:
        log.warning("shutting down: %s %s cut after %.1f s, answered 503", scope["method"], scope["path"], seconds)
        body = json.dumps({"error": SHUTTING_DOWN}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", RETRY_AFTER.encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
        return
    log.warning("shutting down: %s %s cut after %.1f s, its stream ended with an error event", scope["method"],
                scope["path"], seconds)
    tail = f"event: error\ndata: {json.dumps({'error': SHUTTING_DOWN})}\n\n".encode() if progress["events"] else b""
    await send({"type": "http.response.body", "body": tail, "more_body": False})
