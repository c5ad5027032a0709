"""Language detection gives the same answer from many threads at once as from one, first use
included: a server detects on several threads, and langdetect loads its language profiles into one
shared factory on first use (a thread that comes in meanwhile sees some languages only)."""

from __future__ import annotations

import subprocess
import sys

FIRST_USE_FROM_EIGHT_THREADS = """
import threading
from concurrent.futures import ThreadPoolExecutor
from pipeline.text.detect import detect_language
texts = [f"How do {a} and {b} change when rates rise?" for a in ("bonds", "loans", "wages", "stocks")
         for b in ("prices", "savings")]
start = threading.Barrier(len(texts))
def first(text):
    start.wait()
    return detect_language(text)
with ThreadPoolExecutor(len(texts)) as pool:
    print(" ".join(pool.map(first, texts)))
"""


def test_first_detection_from_many_threads_at_once_is_right():
    for _ in range(3):  # a fresh process each time: the first use is the one that races
        proc = subprocess.run([sys.executable, "-c", FIRST_USE_FROM_EIGHT_THREADS], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["en"] * 8
