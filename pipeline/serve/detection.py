"""Language detection for /detect and /translate's `source: auto`, in a process of its own.

langdetect is pure Python: a thread running it holds the interpreter's lock in 5 ms slices, and
every stage thread that gives the lock up for a torch call then waits a slice to get it back, so a
flood of /detect on a thread slowed a question eightfold (tests/serve/test_floods.py). In a worker
process it takes a core, not the lock. Short texts (under DETECT_INLINE_CHARS, a question's size)
are detected at once on the loop, as the question pipeline detects its question: milliseconds, and
no round trip. The worker runs niced, so where cores are short the server's own threads come first.
This module imports no model: the worker process starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pipeline.errors import BilingualQAError
from pipeline.text.detect import detect_language, langdetect_candidates

DETECT_INLINE_CHARS = 4_000
DETECT_NICENESS = 10


def languages_of(texts: list[str], source: str) -> list[tuple[str, float]]:
    """Each text's language and LibreTranslate's 0-100 confidence (`source` "auto"), or `source` itself
    at 100. An empty text is an error in the API's words."""
    found = []
    for text in texts:
        if not text.strip():
            raise BilingualQAError("q is empty: give the text to translate")
        language = detect_language(text) if source == "auto" else source
        found.append((language, confidence(text, language) if source == "auto" else 100.0))
    return found


def confidence(text: str, lang: str) -> float:
    """LibreTranslate's 0-100 confidence: langdetect's probability for `lang`, or 100 where the script
    decided alone (kana, hangul, short ASCII), which langdetect is not asked about."""
    from langdetect.lang_detect_exception import LangDetectException

    try:
        for candidate in langdetect_candidates(text):
            if candidate.lang.split("-")[0] == lang:
                return round(candidate.prob * 100, 1)
    except LangDetectException:
        pass
    return 100.0


def _background() -> None:
    """The worker yields the CPU to the server's own threads where cores are short (nice 10)."""
    if hasattr(os, "nice"):
        os.nice(DETECT_NICENESS)


class Detector:
    """One worker process, started at the first long text and kept; `close` ends it."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    async def languages(self, texts: list[str], source: str = "auto") -> list[tuple[str, float]]:
        if source != "auto" or sum(len(text) for text in texts) <= DETECT_INLINE_CHARS:
            return languages_of(texts, source)
        for attempt in (1, 2):
            if self._pool is None:
                # spawn: a fork of a process running torch threads may inherit a held lock
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_background)
            try:
                return await asyncio.wrap_future(self._pool.submit(languages_of, texts, source))
            except BrokenProcessPool:  # the worker died (killed, out of memory): a new one, once
                self._pool = None
                if attempt == 2:
                    raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
