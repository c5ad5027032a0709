"""Split text into sentences for translation, and put the translated text back in the same shape.

Marian models read at most 512 tokens and translate sentences best, so a text becomes a `Layout`:
the parts kept as they are (line breaks, indentation, list markers, fenced code blocks, inline code)
and runs of sentences to translate. After translation `rebuild` joins each run with the target
language's sentence separator (a space in English, nothing in Japanese) and restores the rest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Union

FENCE = re.compile(r"^[ \t]*(```|~~~).*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)[^`\n]+?\1")
# Markers need a space after them ("3.5%" is no list), except the Japanese ones.
LIST_MARKER = re.compile(r"^(\s*(?:(?:[-*+•>]|\d{1,3}[.)]|#{1,6}|[(（]\d{1,3}[)）])\s+|[・①-⑳]\s*)?)")
# A sentence ends at Japanese 。！？ (spaces optional) or at . ! ? followed by white space.
BOUNDARY = re.compile(r"(?<=[。！？．])[」』）)\"'”’]*\s*|(?<=[.!?])[)\"'”’\]]*\s+|(?<=[!?])(?=[^\x00-\x7f\s!?])")
ABBREVIATIONS = re.compile(
    r"(?:\b(?:e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr|Prof|St|No|Inc|Ltd|Co|Jr|Sr|U\.S|a\.m|p\.m|approx|Fig|cf)\.|\b[A-Z]\.)$"
)
# Enough of a sentence's end for ABBREVIATIONS: its longest word ("approx.") and the character before it.
ABBREVIATION_TAIL = 16
SEPARATOR = {"en": " ", "ja": ""}
PACK_SHARE = 0.9  # an over-long sentence's pieces aim at this share of the model's limit


@dataclass
class SentenceRun:
    """Consecutive sentences of one line, rejoined after translation with the target's separator."""

    sentences: list[str]


Layout = list[Union[str, SentenceRun]]


def split_sentences(text: str) -> list[str]:
    """The sentences of one line of prose (no line breaks inside)."""
    pieces, start = [], 0
    for match in BOUNDARY.finditer(text):
        if match.end() > start and match.start() > start:
            pieces.append(text[start:match.end()].strip())
            start = match.end()
    if text[start:].strip():
        pieces.append(text[start:].strip())
    return _merge_false_breaks([p for p in pieces if p])


def _merge_false_breaks(pieces: list[str]) -> list[str]:
    """Undo breaks after an abbreviation or an initial, or before a lowercase word.

    Linear in the text: a sentence is gathered as a list of pieces and joined once, and only the end
    of its last piece is searched for an abbreviation (ABBREVIATIONS is anchored at the end). Joining
    and searching the growing sentence took minutes on a document of lowercase "sentences"."""
    merged: list[list[str]] = []
    for piece in pieces:
        if merged and (ABBREVIATIONS.search(merged[-1][-1][-ABBREVIATION_TAIL:]) or piece[0].islower()):
            merged[-1].append(piece)
        else:
            merged.append([piece])
    return [" ".join(parts) for parts in merged]


def _plan_prose_line(line: str, layout: Layout) -> None:
    marker = LIST_MARKER.match(line).group(1)
    if marker:
        layout.append(marker)
    rest, position = line[len(marker):], 0
    for code in INLINE_CODE.finditer(rest):
        _plan_prose(rest[position:code.start()], layout)
        layout.append(code.group(0))
        position = code.end()
    _plan_prose(rest[position:], layout)


def _plan_prose(text: str, layout: Layout) -> None:
    """Sentences of `text`, keeping its outer white space (it sits beside inline code)."""
    if not text.strip():
        if text:
            layout.append(text)
        return
    leading = text[: len(text) - len(text.lstrip())]
    trailing = text[len(text.rstrip()):]
    if leading:
        layout.append(leading)
    layout.append(SentenceRun(split_sentences(text.strip())))
    if trailing:
        layout.append(trailing)


def plan_text(text: str) -> Layout:
    """Break `text` into kept parts and runs of sentences to translate."""
    layout: Layout = []
    position = 0
    for block in FENCE.finditer(text):
        _plan_lines(text[position:block.start()], layout)
        layout.append(block.group(0))
        position = block.end()
    _plan_lines(text[position:], layout)
    return layout


def _plan_lines(text: str, layout: Layout) -> None:
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        _plan_prose_line(body, layout)
        if len(body) < len(line):
            layout.append(line[len(body):])


def sentences_of(layout: Layout) -> list[str]:
    return [s for part in layout if isinstance(part, SentenceRun) for s in part.sentences]


def rebuild(layout: Layout, translations: Iterable[str], target_lang: str) -> str:
    """The text of `layout` with its sentences replaced, in order, by `translations`."""
    translated: Iterator[str] = iter(translations)
    separator = SEPARATOR.get(target_lang, " ")
    out = []
    for part in layout:
        if isinstance(part, SentenceRun):
            out.append(separator.join(next(translated) for _ in part.sentences))
        else:
            out.append(part)
    return "".join(out)


def split_to_fit(sentence: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Pieces of an over-long sentence that each fit the model, cut at commas, then at spaces,
    then anywhere; never silently truncated."""
    tokens = count_tokens(sentence)
    if tokens <= max_tokens:
        return [sentence]
    for cut in (re.compile(r"(?<=[,;:、，；：])"), re.compile(r"(?<=\s)")):
        parts = [p for p in cut.split(sentence) if p.strip()]
        if len(parts) > 1:
            # Joined by characters, at the sentence's own characters per token (with room to spare),
            # then each piece counted: a few hundred counts for a 200 KB "sentence", where counting
            # the growing piece at every part took seconds of a tokenizer the server shares.
            budget = max(1, int(len(sentence) * max_tokens * PACK_SHARE / tokens))
            return [fitted for piece in _pack(parts, budget)
                    for fitted in split_to_fit(piece, max_tokens, count_tokens)]
    # No place to cut: equal spans, as many as its tokens need (each counted again, cut again if over).
    spans = max(2, math.ceil(tokens / (max_tokens * PACK_SHARE)))
    size = math.ceil(len(sentence) / spans)
    return [fitted for start in range(0, len(sentence), size)
            for fitted in split_to_fit(sentence[start:start + size], max_tokens, count_tokens)]


def _pack(parts: list[str], budget: int) -> list[str]:
    """Consecutive parts joined while they stay within `budget` characters (a longer part alone)."""
    pieces: list[str] = []
    current = ""
    for part in parts:
        if current and len(current) + len(part) > budget:
            pieces.append(current.strip())
            current = ""
        current += part
    if current.strip():
        pieces.append(current.strip())
    return pieces
