"""The line rules behind answer_end.py: what phi-2 writes before its answer and what ends it.

Each rule looks at one line and the lines before it, never after: a decision taken on a prefix of
the text (while phi-2 is still writing) is the one taken on the whole text. A line that is not
finished yet can be "open": it may still turn into a stop line, so the text from its start is held.
Patterns are compiled with `regex`, whose partial matching says whether an unfinished line can still
become a label.
"""

from __future__ import annotations

import difflib
import re

import regex

# A line that starts a new, labelled turn. Matched at the start of a line, after some answer text.
STOP_LINE = regex.compile(
    r"[ \t]*(?:#+[ \t]*)?(?:"
    r"Instruct(?:ion)?s?:|Output:|Input:|User:|Assistant:|Alice:|Bob:|"
    r"Question(?:[ \t]*(?P<number>\d+))?[ \t]*:|Exercise(?:[ \t]*\d+)?[ \t]*:|"
    r"Follow[- ]?up(?:[ \t]+(?:question|exercise)s?)?(?:[ \t]*\d+)?[ \t]*:|"
    r"Real[- ]world (?:use case|exercises?)s?|Use case[ \t]*\d*[ \t]*:|Topic:|Discussion:"
    r")",
    regex.IGNORECASE,
)
# A label phi-2 puts before its answer ("Answer: ..."), removed at the start only.
LEADING_LABEL = regex.compile(
    r"(?:\*\*)?(?:Answer|Output|Response|Solution)(?:\*\*)?[ \t]*:(?:\*\*)?|A:", regex.IGNORECASE)
# A label phi-2 puts before the question it repeats ("Question: What is a bond?").
ECHO_LABEL = re.compile(r"(?:\*\*)?(?:Question|Instruct|Q)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*", re.IGNORECASE)
# A label before an invented question ("Q: Is my money safe?", "Q2. ...").
QUESTION_LABEL = re.compile(r"Q\d*[ \t]*[:.][ \t]*")

FENCE = re.compile(r"[ \t]{0,3}(?:```|~~~)")
LIST_ITEM = re.compile(r"(?:[-*+•]|\d{1,3}[.)]|[a-zA-Z][.)]|\(\w{1,3}\))[ \t]")
HEADING = re.compile(r"#{1,6}[ \t]")
# Where a line reads as a finished sentence of the answer: the next line may start a new block.
COMPLETE_END = ".!?。！？)]\"'”’*`"
QUESTION_MARKS = ("?", "？")
# A question line is a short line of questions only; a longer one is a paragraph. An invented question
# is a whole sentence: a line of one or two words ("Why?") is the answer's own rhetorical beat.
MAX_QUESTION_LINE = 300
MIN_QUESTION_WORDS = 3

# A sentence that ends with something other than a question mark ("Rates rose. Why?" is a paragraph).
STATEMENT_END = re.compile(r"(\S*)[.!](?=\s)|[。！](?=.)")
ABBREVIATION = re.compile(r"[(\"']*(?:[A-Za-z]|(?:[A-Za-z]\.)+[A-Za-z]|Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|"
                          r"Inc|Ltd|Co|No|approx|Fig|Eq)", re.IGNORECASE)
# Where a sentence may end inside the first line (candidates for the end of an echoed question).
SENTENCE_END = re.compile(r"[.!?。！？](?=\s)")
WORD = re.compile(r"\w+")
# A repeated question need not be word for word (phi-2 rewords a little; an MT question is often odd).
ECHO_SIMILARITY = 0.75

# The user asked for questions: question-shaped lines are then the answer itself.
ASKS_FOR_QUESTIONS = re.compile(
    r"\b(?:questions?|quiz(?:zes)?|faqs?|questionnaires?|q\s*&\s*a)\b"
    r"|\b(?:what|which)\s+(?:should|could|would|can|do|to)\s+(?:i|we|you|one|they|investors?|people)?\s*ask\b"
    r"|\bto ask\b|質問|問題|クイズ|問い",
    re.IGNORECASE,
)


def asks_for_questions(question: str | None) -> bool:
    return bool(question) and ASKS_FOR_QUESTIONS.search(question) is not None


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class Undecided(Exception):
    """The text so far cannot tell yet (it ends inside the part a rule needs to see)."""


def leading_label_end(text: str, pos: int, final: bool) -> int | None:
    """End of an answer label ("Answer:", "A:", "Output:") at `pos`, or None."""
    match = LEADING_LABEL.match(text, pos, partial=not final)
    if match is None:
        return None
    if match.partial:
        raise Undecided
    return match.end()


def after_abbreviation(line: str, dot: int) -> bool:
    """Is the full stop at `dot` the end of an abbreviation ("U.S.", "e.g.") rather than of a sentence?"""
    before = line[:dot].split()
    return line[dot] == "." and bool(before) and ABBREVIATION.fullmatch(before[-1]) is not None


def echo_end(text: str, pos: int, question: str, final: bool) -> int | None:
    """End of the user's question repeated at `pos` (the first sentence or line), or None.

    The candidates are the sentence ends of the first line and the line's end; the first whose
    words match the question's closely enough is the echo. A sentence at least as long as the
    question that does not match means the answer has begun.
    """
    wanted = words(question)
    if not wanted:
        return None
    newline = text.find("\n", pos)
    complete = newline >= 0 or final
    line = text[pos:newline if newline >= 0 else len(text)]
    label = ECHO_LABEL.match(line)
    skip = label.end() if label else 0
    ends = [m.end() for m in SENTENCE_END.finditer(line, skip) if not after_abbreviation(line, m.start())]
    if complete:
        ends.append(len(line.rstrip()))
    for end in ends:
        said = words(line[skip:end])
        if said and difflib.SequenceMatcher(None, wanted, said, autojunk=False).ratio() >= ECHO_SIMILARITY:
            return pos + end
        if len(said) >= len(wanted):
            return None
    # ratio = 2*common/(a+b) < 0.75 once b > 5a/3: a longer first sentence can no longer match. One
    # word of slack covers a label still being written ("Questio" before its colon).
    if complete or len(words(line)) > len(wanted) * 5 / 3 + 1:
        return None
    raise Undecided


def question_line(line: str, complete: bool) -> bool | None:
    """True if `line` is a line of questions only, False if it is not, None if it may still become one."""
    body = line.strip()
    if (label := QUESTION_LABEL.match(body)) is not None:
        body = body[label.end():]
    if len(body) > MAX_QUESTION_LINE:
        return False
    for match in STATEMENT_END.finditer(body):
        if match.group(1) is None or not ABBREVIATION.fullmatch(match.group(1)):
            return False
    if complete:
        return body.endswith(QUESTION_MARKS) and len(words(body)) >= MIN_QUESTION_WORDS
    return None


class BodyState:
    """What the lines before the current one say about it."""

    def __init__(self):
        self.in_fence = False
        self.seen_text = False  # some answer text precedes the current line
        self.previous = ""  # the last non-blank line, stripped
        self.blank_before = False  # a blank line between it and the current line
        self.previous_question = False  # the last non-blank line was a question line that was kept
        self.headings = False  # the answer has headings of its own

    def opens_block(self) -> bool:
        """Would a question line here start a new block after complete answer text?"""
        if not self.seen_text or self.previous_question or self.previous.endswith((":", "：")):
            return False  # before any answer, inside a list of questions, or after "here are...:"
        return self.blank_before or self.previous.endswith(tuple(COMPLETE_END))

    def add(self, line: str) -> None:
        stripped = line.strip()
        if FENCE.match(line):
            self.in_fence = not self.in_fence
        elif self.in_fence:
            return
        if not stripped:
            self.blank_before = True
            return
        item = LIST_ITEM.match(stripped)
        self.previous_question = question_line(stripped[item.end():] if item else stripped, True)
        self.seen_text, self.previous, self.blank_before = True, stripped, False
        self.headings = self.headings or HEADING.match(stripped) is not None


# judge_line's verdicts
KEEP, STOP, OPEN = "keep", "stop", "open"


def judge_line(line: str, complete: bool, state: BodyState, asks: bool) -> str:
    """Does `line` end the answer (STOP), not (KEEP), or can the text so far not tell yet (OPEN)?"""
    stripped = line.strip()
    if FENCE.match(line) or state.in_fence or not state.seen_text:
        return KEEP  # code is never cut; the answer's first line is its own
    if not stripped:
        return KEEP if complete else OPEN
    label = STOP_LINE.match(line, partial=not complete)
    if label is not None:
        if label.partial:
            return OPEN
        if not (asks and label.group("number")):  # "Question 2:" is the answer when questions were asked for
            return STOP
    if asks or line[:1] in " \t" and line[:2].strip() == "" or not state.opens_block():
        return KEEP  # asked-for questions, an indented (code or continued) line, or not a new block
    text = stripped
    if HEADING.match(text):
        if state.headings:
            return KEEP  # a section of an answer that has headings of its own
        text = text.lstrip("#").strip()
    if LIST_ITEM.match(text) and not QUESTION_LABEL.match(text) or text[:1] in ">|":
        return KEEP  # an item of a list, a quote or a table row the answer is building
    verdict = question_line(text, complete)
    return STOP if verdict else OPEN if verdict is None else KEEP
