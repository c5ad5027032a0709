"""Ending a command's process without the interpreter's teardown once a GPU was used.

After a cold `ask` on an H200 has printed its answer, the normal exit takes another 0.74-0.77 s:
Python's finalisation frees every tensor, module and Triton kernel one by one, and torch's
destructors then tear down the CUDA context it had built. Nothing of that is work a finished
command needs: its output is written and flushed, its files closed (the translation memory is
SQLite in autocommit mode, each write its own transaction), and the operating system takes the
memory back in one go. `os._exit` after flushing the standard streams ends it in 0.16-0.20 s
(docs/design.md, "Ending the process"; figures in docs/benchmarks.md, benchmarks/exit_cost.py).

Only where it is safe: a process that never initialised CUDA exits normally (nothing slow to skip),
and so does one with another thread still alive (it may be writing: a batch job's pool, a server) or
one under a profiler, tracer or coverage tool, which write their results at exit.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading


def _observed() -> bool:
    """A profiler, tracer or coverage tool is watching: it writes its results at the normal exit."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: cProfile and coverage use it
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def _cuda_used() -> bool:
    torch = sys.modules.get("torch")  # never imported for this: a command that needed no model did not
    return torch is not None and torch.cuda.is_initialized()


def skips_teardown() -> bool:
    """Whether `leave` ends the process with os._exit (see the module docstring)."""
    return _cuda_used() and threading.active_count() == 1 and not _observed()


def leave(code: int | str | None) -> None:
    """Exit with `code` as sys.exit would (a str is printed to stderr, exit 1), skipping the
    interpreter's teardown where skips_teardown() says it may."""
    if not skips_teardown():
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what it could not take is lost either way
            pass
    os._exit(code or 0)


def ends_quickly(entry):
    """`entry` (a console entry point), ending through `leave` with the code it exits with."""
    @functools.wraps(entry)
    def run() -> None:
        try:
            entry()
        except SystemExit as done:
            leave(done.code)
        leave(0)
    return run
