"""What every document format hands the job: segments of prose, each made of pieces of the source.

A segment is one text for the translator (a paragraph, a table cell, a subtitle cue, a Word
paragraph). Its words may sit in several places of the source: the lines of a wrapped paragraph,
the runs around a bold word, the lines of a cue. Those places are its pieces; everything between
them (markup, container markers, tags, line breaks) is never touched. The translation is cut back
into as many parts as there are pieces: where it is as long as the source, at the very same places
(so a translator that only changes letters changes exactly the letters); otherwise in proportion to
the pieces' lengths, at the nearest space, so the markup lands at the matching share of the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass
class Piece:
    start: int  # offsets into the format's own source (characters of a text, or an index)
    end: int
    text: str  # what the piece says (entities and escapes decoded)


@dataclass
class Segment:
    pieces: list[Piece]
    joins: list[str] = field(default_factory=list)  # what stands between piece i and i+1 in `text`

    @cached_property
    def text(self) -> str:
        parts = [self.pieces[0].text]
        for join, piece in zip(self.joins, self.pieces[1:]):
            parts += [join, piece.text]
        return "".join(parts)


def worth_translating(text: str) -> bool:
    """Text with a letter in it: numbers, punctuation and bare symbols are kept as they are."""
    return any(map(str.isalpha, text))


def from_runs(runs: list[tuple[int, int, str]], source: str) -> Segment | None:
    """A segment from runs of text in `source`, as (start, end, decoded text): the space at either
    end of a run is left outside its piece (next to the markup it separates); two pieces are joined
    by a space where the source has one between them. None where nothing is worth translating."""
    pieces, joins = [], []
    for start, end, text in runs:
        raw = source[start:end]
        lead, trail = len(raw) - len(raw.lstrip()), len(raw) - len(raw.rstrip())
        if lead == len(raw):
            continue
        if pieces:
            between = source[pieces[-1].end:start + lead]
            joins.append(" " if any(ch.isspace() for ch in between) else "")
        pieces.append(Piece(start + lead, end - trail, text[lead:len(text) - trail]))
    segment = Segment(pieces, joins) if pieces else None
    return segment if segment is not None and worth_translating(segment.text) else None


def _cut(text: str, target: int, previous: int, spaces: list[int]) -> int:
    """Where the next part ends: the space nearest to `target` that leaves the part some words,
    else `target` itself (text without spaces, as Japanese is written)."""
    usable = [at for at in spaces if at > previous and text[previous:at].strip()]
    if usable:
        return min(usable, key=lambda at: abs(at - target))
    return max(previous, min(len(text), target))


def distribute(segment: Segment, translation: str, strip: bool = True) -> list[str]:
    """The translation cut into one part per piece (see the module's docstring)."""
    pieces = segment.pieces
    source = segment.text
    if translation == source:
        return [piece.text for piece in pieces]
    if len(pieces) == 1:
        return [translation.strip(" ") if strip else translation]
    bounds, at = [], 0
    for piece, join in zip(pieces, segment.joins + [""]):
        bounds.append((at, at + len(piece.text)))
        at += len(piece.text) + len(join)
    if len(translation) == len(source):
        return [translation[start:end] for start, end in bounds]
    scale = len(translation) / max(len(source), 1)
    spaces = [at for at, ch in enumerate(translation) if ch.isspace()]
    cuts = [0]
    for start, _ in bounds[1:]:
        cuts.append(_cut(translation, round(start * scale), cuts[-1], spaces))
    cuts.append(len(translation))
    parts = [translation[a:b] for a, b in zip(cuts, cuts[1:])]
    parts = [part.strip() for part in parts] if strip else parts
    if all(parts) or len(translation.strip()) < len(pieces):
        return parts
    # A piece left empty could break the markup around it (an empty `**` pair): cut by characters.
    text = translation.strip()
    step = len(text) / len(pieces)
    return [text[round(i * step):round((i + 1) * step)] for i in range(len(pieces))]


def replace_pieces(source: str, replacements: list[tuple[int, int, str]]) -> str:
    """`source` with each (start, end) span replaced; spans do not overlap."""
    out, at = [], 0
    for start, end, text in sorted(replacements):
        out += [source[at:start], text]
        at = end
    out.append(source[at:])
    return "".join(out)
