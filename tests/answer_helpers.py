"""Views of text/answer_end.py's rules that only tests read (imported by name: tests/ is on the path
through its conftest). The package itself uses `locate_answer`, `trim_answer`, `EndWatch` and
`settled_span`; these spell the questions the tests ask of them."""

from __future__ import annotations

from typing import Iterable, Iterator

from pipeline.text.answer_end import locate_answer, settled_span, trim_answer


def find_stop(text: str, question: str | None = None) -> int | None:
    """Index where the answer in the finished `text` ends because something else begins, or None."""
    return locate_answer(text, question).end


def answer_ended(text: str, question: str | None = None) -> bool:
    """True once the text phi-2 is writing has certainly gone past the answer's end."""
    return locate_answer(text, question, final=False).end is not None


def settled_answer(text: str, question: str | None = None) -> str:
    """The part of the trimmed answer that no continuation of `text` can change (for streaming)."""
    return settled_span(text, question)[0]


def stream_answer(texts: Iterable[str], question: str | None = None) -> Iterator[str]:
    """Pieces of the trimmed answer, given the text decoded so far after each new token: the pieces
    joined equal `trim_answer(last text)`, nothing shown is taken back, and each piece is shown as
    soon as no later text can cut it."""
    shown = ""
    text = ""
    for text in texts:
        ready = settled_answer(text, question)
        if len(ready) > len(shown):
            yield ready[len(shown):]
            shown = ready
    final = trim_answer(text, question)[0]
    if len(final) > len(shown):
        yield final[len(shown):]
