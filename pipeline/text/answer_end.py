"""Where phi-2's answer begins and ends.

phi-2 is a base model: it often repeats the question and labels its answer ("Answer: ..."), and after
answering it goes on to invent the next turn of a textbook: a labelled one ("Exercise 3:",
"Question: ...", a new "Instruct:" block) or a bare new question on a line of its own, which it then
answers. `trim_answer` keeps the answer only; the rules are in answer_rules.py and docs/design.md.

The same rules run three ways, and agree: on the finished text (`trim_answer`), on the text while it
is generated (`EndWatch`, the engines' stop check: true as soon as the end is certain), and for
streaming (`settled_span`: the part of the answer no later text can cut).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from pipeline.text.answer_rules import (OPEN, STOP, BodyState, Undecided, asks_for_questions, echo_end, judge_line,
                                        leading_label_end, skip_space)

END_OF_TEXT = "<|endoftext|>"
LEADING_PASSES = 4  # "Question: <question>\nAnswer:" is three; a fourth is slack


@dataclass(frozen=True)
class AnswerSpan:
    """Where the answer lies in a text phi-2 wrote (indices into that text)."""

    start: int | None  # after the repeated question and labels; None while the text cannot tell yet
    end: int | None  # where something other than the answer begins; None if nothing has (yet)
    settled: int  # text[:settled] stays as it is whatever phi-2 writes next


@dataclass
class LineMemo:
    """How far an earlier, shorter prefix of the same growing text was judged: the end of its last
    whole line (a line up to its newline is judged from itself and the lines before it alone, so a
    longer prefix judges it the same) and the body state after it. Spares a stream re-reading every
    line at every token."""

    start: int | None = None  # the answer's start these lines were judged from
    pos: int = 0
    state: BodyState = field(default_factory=BodyState)


def answer_start(text: str, question: str | None, final: bool) -> int:
    """Index after the leading repeated question and answer labels; raises Undecided on a short prefix."""
    pos = skip_space(text, 0)
    echoed = False  # the question is removed once; a second copy would be the answer's own words
    for _ in range(LEADING_PASSES):
        if pos == len(text) and not final:
            raise Undecided  # a label or the question may come next
        end = leading_label_end(text, pos, final)
        if end is None and question and not echoed:
            end = echo_end(text, pos, question, final)
            echoed = end is not None
        if end is None:
            break
        pos = skip_space(text, end)
    return pos


def locate_answer(text: str, question: str | None = None, *, final: bool = True,
                  start: int | None = None, memo: LineMemo | None = None) -> AnswerSpan:
    """The answer's span in `text`; `final=False` for a text phi-2 is still writing.

    `start`: the answer's start found on an earlier prefix of this text (it never moves once known),
    which spares the stop check comparing the first sentence with the question at every token.
    `memo`: where the same growing text was judged before (updated here), so that only the lines
    since are read.

    On a prefix, every index this returns is the one the finished text will give: a line is judged
    only from itself and the lines before it, and a line that may still become a stop holds `settled`
    at its start.
    """
    eot = text.find(END_OF_TEXT)
    if eot >= 0:  # another document starts: the text ends here, whatever follows
        text, final = text[:eot], True
    held = 0 if final else partial_marker(text)
    if start is None:
        try:
            start = answer_start(text, question, final)
        except Undecided:
            return AnswerSpan(None, None, 0)
    asks = asks_for_questions(question)
    state, pos = BodyState(), start
    if memo is not None and memo.start == start and start <= memo.pos <= len(text):
        state, pos = copy.copy(memo.state), memo.pos
    while pos < len(text):
        newline = text.find("\n", pos)
        line_end = newline if newline >= 0 else len(text)
        line = text[pos:line_end]
        verdict = judge_line(line, newline >= 0 or final, state, asks)
        if verdict == STOP:
            return AnswerSpan(start, pos, pos)
        if verdict == OPEN:
            return AnswerSpan(start, None, min(pos, len(text) - held))
        state.add(line)
        pos = line_end + 1
        if memo is not None and newline >= 0:
            memo.start, memo.pos, memo.state = start, pos, copy.copy(state)
    return AnswerSpan(start, eot if eot >= 0 else None, len(text) - held)


def partial_marker(text: str) -> int:
    """Length of the end of `text` that may be the start of an end-of-text marker."""
    for size in range(min(len(END_OF_TEXT) - 1, len(text)), 0, -1):
        if END_OF_TEXT.startswith(text[-size:]):
            return size
    return 0


def trim_answer(text: str, question: str | None = None) -> tuple[str, bool]:
    """The answer alone, and True if anything was removed (a repeated question, a label, a tail).

    `question` is the question phi-2 was asked (in English): it is needed to recognise it repeated,
    and to keep question lines when the user asked for questions.
    """
    span = locate_answer(text, question)
    end = len(text) if span.end is None else span.end
    head = text[:span.start]
    return text[span.start:end].strip(), span.end is not None or bool(head.strip())


class EndWatch:
    """Whether one growing text has certainly gone past the answer's end, remembering the answer's
    start once it is known."""

    def __init__(self, question: str | None):
        self.question, self.start, self.memo = question, None, LineMemo()

    def __call__(self, text: str) -> bool:
        span = locate_answer(text, self.question, final=False, start=self.start, memo=self.memo)
        self.start = span.start
        return span.end is not None


def settled_span(text: str, question: str | None = None, start: int | None = None,
                 memo: LineMemo | None = None) -> tuple[str, AnswerSpan]:
    """The part of the trimmed answer that no continuation of `text` can change (for streaming), and
    the span it comes from (`start`: the answer's start if already known; `memo`: the lines of this
    growing text judged before)."""
    span = locate_answer(text, question, final=False, start=start, memo=memo)
    if span.start is None:
        return "", span
    if span.end is not None:
        return text[span.start:span.end].strip(), span
    # A partly decoded character shows as U+FFFD; trailing space may turn out to be the answer's end.
    return text[span.start:span.settled].rstrip().rstrip("\ufffd").rstrip(), span
