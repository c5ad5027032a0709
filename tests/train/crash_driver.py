"""Runs `bilingual-qa finetune ARGS...` and dies by SIGKILL at a named point, like a kill -9 there.

    python tests/train/crash_driver.py POINT N ARGS...

The N-th time the run reaches POINT ("after_step", "after_save"; or the pair job's "mid_chunk",
"before_progress", "after_progress") the process kills itself. The checkpoint is passed into the
run from here: production code has no hook.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))  # tests/jobs/crashes.py

from crashes import crash_at  # noqa: E402

from pipeline import cli  # noqa: E402
from pipeline.train import run  # noqa: E402


def die(name: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    point, occurrence, *args = sys.argv[1:]
    train_adapter, checkpoint = run.train_adapter, crash_at(point, int(occurrence), die)
    run.train_adapter = lambda job, *_: train_adapter(job, checkpoint)
    sys.argv = ["bilingual-qa", *args]
    cli.run()
