"""Crash points for the job tests. The job runner takes a `checkpoint(name)` callable (production code
has no hook); these stop a job the N-th time it reaches a named point ("mid_chunk",
"before_progress", "after_progress")."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Callable


class Crash(BaseException):
    """Stands for kill -9 inside the test process."""


def raise_crash(name: str) -> None:
    raise Crash(name)


def crash_at(point: str, occurrence: int, crash: Callable[[str], None] = raise_crash) -> Callable[[str], None]:
    """A checkpoint that calls `crash` (default: raise Crash) the `occurrence`-th time the job reaches `point`."""
    seen = 0

    def checkpoint(name: str) -> None:
        nonlocal seen
        if name == point:
            seen += 1
            if seen == occurrence:
                crash(name)

    return checkpoint


def kill_when_committed(process, progress: Path, rows: int, seconds: float, *, poll: float = 0.01,
                        while_waiting: Callable[[], None] = lambda: None) -> None:
    """kill -9 `process` once its progress record counts `rows` committed rows (or after `seconds`);
    `while_waiting` runs at each look. Asserts it was killed, not finished."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        while_waiting()
        try:
            if json.loads(progress.read_text())["counts"]["rows"] >= rows:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(poll)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed, not finished
