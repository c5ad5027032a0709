"""One process-wide gate between CUDA graph capture and GPU work on other threads.

A capture fails if another thread, meanwhile, synchronises the device or makes a call that touches
the capturing stream; the server runs phi-2 and both translators on threads of their own, and each
fast path captures its graphs when it first meets a batch shape. So each stage thread does its GPU
work inside `GATE.work()`, and each capture runs inside `GATE.capture()`, which waits for the other
threads' work to finish and holds new work back until the graph is captured. A thread that captures
in the middle of its own work lets go of its share while it waits, so two captures never deadlock.
In a single-threaded process (the CLI) the gate is never contended and costs a lock per call.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator


class GpuGate:
    def __init__(self):
        self._changed = threading.Condition()
        self._working = 0  # threads inside work()
        self._capturing = False
        self._depth = threading.local()  # this thread's nesting of work()

    def _mine(self) -> int:
        return getattr(self._depth, "count", 0)

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """GPU work that may run beside another thread's capture."""
        with self._changed:
            if self._mine() == 0:
                self._changed.wait_for(lambda: not self._capturing)
                self._working += 1
            self._depth.count = self._mine() + 1
        try:
            yield
        finally:
            with self._changed:
                self._depth.count -= 1
                if self._depth.count == 0:
                    self._working -= 1
                    self._changed.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """A CUDA graph capture: no other thread's GPU work runs until it ends."""
        with self._changed:
            mine = self._mine() > 0
            if mine:  # this thread's own work pauses here, so it must not hold the others back
                self._working -= 1
                self._changed.notify_all()
            self._changed.wait_for(lambda: not self._capturing and self._working == 0)
            self._capturing = True
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                if mine:
                    self._working += 1
                self._changed.notify_all()

    def in_background(self, job: Callable[[], object], name: str) -> Future:
        """`job()` in a thread of its own, as GPU work (inside `work()`): a capture on another thread
        waits for it rather than breaking on its allocations or copies. The future holds its result."""

        def gated():
            with self.work():
                return job()

        pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        future = pool.submit(gated)
        pool.shutdown(wait=False)  # the thread ends with its job
        return future


GATE = GpuGate()
