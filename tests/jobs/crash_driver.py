"""Runs `bilingual-qa ARGS...` and dies by SIGKILL at a named point of the job, like a kill -9 there.

    python tests/jobs/crash_driver.py POINT N ARGS...

The N-th time the job reaches POINT ("mid_chunk", "before_progress", "after_progress"), the process
kills itself. The checkpoint is passed into the job runner from here: production code has no hook.
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import cli
from pipeline.jobs import documents, workers

from crashes import crash_at  # beside this file


def die(name: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    point, occurrence, *args = sys.argv[1:]
    run_job, checkpoint = workers.run_job, crash_at(point, int(occurrence), die)
    workers.run_job = lambda *a, **kw: run_job(*a, **{**kw, "checkpoint": checkpoint})
    documents.run_job = workers.run_job  # document jobs run through the same runner
    sys.argv = ["bilingual-qa", *args]
    cli.run()
