"""Where phi-2's answer ends.

phi-2 is a base model: after answering it often goes on to invent the next turn of a textbook
("Exercise 3:", "Question: ...", a new "Instruct:" block, follow-up questions). Such a line marks the
end of the answer. Generation checks for these while it runs (to stop early) and the final text is
cut at the first one (a few tokens may have been generated past it).
"""

from __future__ import annotations

import re

# A line that starts a new turn. Matched at the start of a line, after at least some answer text.
STOP_LINE = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?(?:"
    r"Instruct(?:ion)?s?:|Output:|Input:|User:|Assistant:|Alice:|Bob:|"
    r"Question(?:[ \t]*\d+)?[ \t]*:|Exercise(?:[ \t]*\d+)?[ \t]*:|"
    r"Follow[- ]?up(?:[ \t]+(?:question|exercise)s?)?(?:[ \t]*\d+)?[ \t]*:|"
    r"Real[- ]world (?:use case|exercises?)s?|Use case[ \t]*\d*[ \t]*:|Topic:|Discussion:"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
END_OF_TEXT = "<|endoftext|>"


def find_stop(text: str) -> int | None:
    """Index where the answer in `text` ends because a new turn starts, or None."""
    positions = []
    if (eot := text.find(END_OF_TEXT)) >= 0:
        positions.append(eot)
    start = len(text) - len(text.lstrip())
    for match in STOP_LINE.finditer(text):
        if match.start() > start:  # a stop line before any answer is the answer's own label
            positions.append(match.start())
            break
    return min(positions) if positions else None


def trim_answer(text: str) -> tuple[str, bool]:
    """The answer without anything from the first stop on; True if something was cut."""
    stop = find_stop(text)
    if stop is None:
        return text.strip(), False
    return text[:stop].strip(), True
