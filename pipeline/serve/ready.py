"""Waiting for a server to answer: the one "until /health says 200" loop that the tests and benchmarks
which start `bilingual-qa serve` share. The standard library only, so a process that measures a
server imports nothing of the server's."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a proxy never sees loopback


class ServerNotReady(RuntimeError):
    """The server exited, failed to load its models, or did not answer in time."""


def wait_until_ready(url: str, *, process: subprocess.Popen | None = None, timeout: float = 120.0,
                     every: float = 0.3) -> None:
    """Return once `GET {url}/health` answers 200. Raises ServerNotReady at once when `process` (the
    server's) has exited or /health reports that loading failed, and after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReady(f"the server exited with code {process.returncode} before it was ready")
        try:
            with _DIRECT.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503: loading, or loading failed
            _raise_if_failed(error)
        except (OSError, ValueError):  # not listening yet, reset, a timeout
            pass
        if time.monotonic() > deadline:
            raise ServerNotReady(f"the server at {url} was not ready within {timeout:.0f} s")
        time.sleep(every)


def _raise_if_failed(error: urllib.error.HTTPError) -> None:
    try:
        body = json.loads(error.read() or b"{}")
    except ValueError:
        return
    if isinstance(body, dict) and body.get("status") == "error":
        raise ServerNotReady(f"the server could not load its models: {body.get('error')}")
