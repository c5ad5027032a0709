"""Status lines for the user on stderr, kept off stdout so JSON output stays clean."""

from __future__ import annotations

import os
import sys

QUIET_ENV = "BILINGUAL_QA_QUIET"


def status(message: str) -> None:
    """One line of what is happening (loading, downloading, a fallback); silent under --quiet."""
    if os.environ.get(QUIET_ENV) != "1":
        print(f"bilingual-qa: {message}", file=sys.stderr, flush=True)


def notice(message: str) -> None:
    """A one-line note the user should read (a fallback to something slower, a conversion)."""
    status(f"note: {message}")
