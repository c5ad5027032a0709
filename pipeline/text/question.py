"""The question a user gave, checked before any model runs (no torch here: the CLI refuses a bad
question without importing one)."""

from __future__ import annotations

from pipeline.errors import EmptyInputError, InputTooLongError
from pipeline.text.controls import refuse_controls

MAX_QUESTION_CHARS = 4000  # far past what phi-2's 2048 positions hold; refused before any model runs


def check_question(text: str) -> str:
    text = refuse_controls(text)
    if not text or not text.strip():
        raise EmptyInputError("the question is empty: type a question in Japanese or English")
    if len(text) > MAX_QUESTION_CHARS:
        raise InputTooLongError(f"the question is {len(text)} characters long; the limit is {MAX_QUESTION_CHARS}")
    return text.strip()
