"""Markdown: the prose of paragraphs, headings, list items, table cells, block quotes, link and
image text is translated; every other byte stays where it is.

markdown-it-py (CommonMark, plus GFM tables and strikethrough, front matter, `$` math) finds the
blocks and their inline tokens. Its source map is per line of blocks only, so two small additions
give every text token its place: the inline parser runs on a state that records where each pending
text run and each pushed token starts (`_TrackingState`), and each line of a block's inline content
is found again in its source line (containers' markers and indentation are what was stripped).
Every piece is checked against the source it claims (`src[start:end]` is its text); a block where
one is not (a table cell with an escaped pipe, say) is kept untranslated rather than guessed.

Code (spans and blocks), HTML, autolinks, link targets, reference definitions, front matter and math
are never pieces, so they are kept byte for byte; so are emphasis markers, which stay around their
(translated) words. A translated part is escaped where Markdown would read it as markup.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from markdown_it import MarkdownIt
from markdown_it.parser_inline import ParserInline
from markdown_it.rules_inline import StateInline
from mdit_py_plugins.dollarmath import dollarmath_plugin
from mdit_py_plugins.front_matter import front_matter_plugin

from pipeline.documents.segments import Piece, Segment, distribute, replace_pieces, worth_translating

BREAKS = {"softbreak", "hardbreak"}
# `>` only means something at the start of a line (a block quote), where LINE_START_ESCAPED has it.
ESCAPED = set("\\`*_[]<&|~$#")
LINE_START_ESCAPED = set("#+-=>")
CONTROL_REFERENCES = {"\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}
SPECIAL = ESCAPED | LINE_START_ESCAPED | set(CONTROL_REFERENCES)
CONTROL_CHARACTERS = set(CONTROL_REFERENCES)
ALWAYS_ESCAPED = set("\\&<")  # never left as the source had them: they start escapes, entities, HTML


class _TrackingState(StateInline):
    """An inline state that notes where in its source each token's text begins."""

    def append_pending(self, text: str) -> None:
        if not self.pending:
            self.pending_start = self.pos  # every caller appends before moving `pos` past the text
        super().append_pending(text)

    def pushPending(self):
        token = super().pushPending()
        token.meta["src"] = self.pending_start
        return token

    def push(self, ttype, tag, nesting):
        token = super().push(ttype, tag, nesting)
        token.meta["at"] = self.pos
        return token


class _TrackingInline(ParserInline):
    def parse(self, src, md, env, tokens):
        state = _TrackingState(src, md, env, tokens)
        self.tokenize(state)
        for rule in self.ruler2.getRules(""):
            rule(state)
        return state.tokens


def make_parser() -> MarkdownIt:
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    md.use(front_matter_plugin).use(dollarmath_plugin, allow_digits=False, allow_space=False)
    # Joining text tokens would merge decoded escapes into text and lose where each piece came from.
    md.disable(["text_join", "fragments_join"])
    tracking = _TrackingInline()
    tracking.__dict__.update(md.inline.__dict__)
    md.inline = tracking
    return md


def _line_starts(text: str) -> list[int]:
    """Where each line begins (after \\n, \\r\\n or \\r: the line endings markdown-it counts)."""
    starts, at = [0], text.find("\n")
    if "\r" not in text:
        while at >= 0:
            starts.append(at + 1)
            at = text.find("\n", at + 1)
        return starts
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\r" and i + 1 < len(text) and text[i + 1] == "\n":
            i += 1
        if ch in "\r\n":
            starts.append(i + 1)
        i += 1
    return starts


@dataclass
class _Line:
    content_start: int  # where the line begins in the block's inline content
    source_start: int | None  # where that is in the document (None: the line was not found)
    padding: int = 0  # leading columns the parser made up (a tab's remainder): no source


class _Block:
    """One inline token's content, mapped back to the document line by line."""

    def __init__(self, doc: "MarkdownDocument", content: str, first_line: int, opener):
        self.lines: list[_Line] = []
        tail = opener.type == "paragraph_open" or opener.markup in ("=", "-")
        cursor = 0
        if opener.type == "heading_open" and not tail:
            line = doc.source_line(first_line)
            cursor = line.find(opener.markup) + len(opener.markup)
        at = 0
        parts = content.split("\n")
        for k, part in enumerate(parts):
            number = first_line + k
            line = doc.source_line(number)
            if tail and k == len(parts) - 1:
                line = line.rstrip()
            start, padding = self._locate(line, part, tail, doc.cursors.get(number, cursor) if k == 0 else 0)
            if start is not None and not tail:
                doc.cursors[number] = start + len(part)
            source = None if start is None else doc.line_starts[number] + start
            self.lines.append(_Line(at, source, padding))
            at += len(part) + 1
        self.starts = [line.content_start for line in self.lines]

    @staticmethod
    def _locate(line: str, part: str, tail: bool, cursor: int) -> tuple[int | None, int]:
        padding = len(part) - len(part.lstrip(" "))
        for pad in (0, padding) if padding else (0,):
            wanted = part[pad:]
            if tail:
                if line.endswith(wanted):
                    return len(line) - len(wanted) - pad, pad
            else:
                found = line.find(wanted, cursor)
                if found >= 0:
                    return found - pad, pad
        return None, 0

    def source(self, position: int) -> int | None:
        k = bisect_right(self.starts, position) - 1
        line = self.lines[k]
        column = position - line.content_start
        if line.source_start is None or column < line.padding:
            return None
        return line.source_start + column

    def line_of(self, position: int) -> int:
        return bisect_right(self.starts, position) - 1


class _Unplaced(Exception):
    """A token's text could not be found where the parser says it is: keep the block."""


DELIMITERS = {"em_open", "em_close", "strong_open", "strong_close", "s_open", "s_close"}


def _text_tokens(children, offset: int):
    """(start, end, decoded text, source text) in the content for each text-like token, in order;
    (None, token, None, None) for any other. Emphasis and strikethrough push a delimiter run as
    several tokens at one position: they are laid out one after another."""
    last_at, run = None, 0
    for token in children:
        at = token.meta.get("at")
        if token.type == "text" and "src" in token.meta:
            start, last_at = token.meta["src"] + offset, None
        elif token.type == "text" or token.type in DELIMITERS:
            run = run if at == last_at else 0
            start, last_at = at + offset + run, at
            run += len(token.content or token.markup)
            if token.type != "text":
                yield None, token, None, None
                continue
        elif token.type == "text_special":
            start = at + offset
            yield start, start + len(token.markup), token.content, token.markup
            continue
        else:
            last_at = None
            yield None, token, None, None
            continue
        yield start, start + len(token.content), token.content, token.content


def _label_is_target(content: str, close_at: int) -> bool:
    """Whether the link whose label ends at `close_at` (its `]`) is a shortcut or collapsed
    reference: then its text is the label that finds the link's definition, and is kept."""
    after = content[close_at + 1:close_at + 3]
    return not after.startswith("(") and (not after.startswith("[") or after == "[]")


class MarkdownDocument:
    def __init__(self, text: str):
        self.bom = "\ufeff" if text.startswith("\ufeff") else ""
        self.text = text[len(self.bom):]
        self.line_starts = _line_starts(self.text)
        self.cursors: dict[int, int] = {}
        self.references: dict[str, str] = {}  # a character the source wrote as an entity or escape -> how
        self.segments: list[Segment] = []
        self.spans: list[list[bool]] = []  # per piece of each segment: whether it starts a line
        self.parser = make_parser()
        tokens = self.parser.parse(self.text)
        self._walk(tokens)

    def source_line(self, number: int) -> str:
        start = self.line_starts[number]
        end = self.line_starts[number + 1] if number + 1 < len(self.line_starts) else len(self.text)
        return self.text[start:end].rstrip("\r\n")

    def _walk(self, tokens) -> None:
        row_map = None
        for i, token in enumerate(tokens):
            if token.type == "tr_open":
                row_map = token.map
            if token.type != "inline" or not token.children:
                continue
            lines = token.map or row_map
            if lines is None:
                continue
            block = _Block(self, token.content, lines[0], tokens[i - 1])
            try:
                found = list(self._segments(block, token.children, token.content, 0))
            except _Unplaced:
                continue
            for segment, spans in found:
                self.segments.append(segment)
                self.spans.append(spans)

    def _segments(self, block: _Block, children, content: str, offset: int):
        """The block's prose as one segment, and each image's alt text as one of its own."""
        runs: list[list] = []  # [start, end, decoded text] of contiguous text in the content
        kept = self._kept_links(children, content, offset)
        depth = 0  # inside a link whose text is kept
        for start, end, text, raw in _text_tokens(children, offset):
            if start is None:
                token = end
                if token.type == "link_open":
                    depth += id(token) in kept
                elif token.type == "link_close":
                    depth -= id(token) in kept
                elif token.type == "image" and token.children and not depth:
                    at = token.meta["at"] + offset
                    if content[at:at + 2] != "![":
                        raise _Unplaced
                    if not self._image_label_is_target(content, at):
                        yield from self._segments(block, token.children, content, at + 2)
                continue
            if depth:
                continue
            if content[start:end] != raw:
                raise _Unplaced
            if raw != text and not text.isspace() and len(text) == 1:
                self.references.setdefault(text, raw)
            if runs and runs[-1][1] == start:
                runs[-1][1], runs[-1][2] = end, runs[-1][2] + text
            else:
                runs.append([start, end, text])
        found = self._segment(block, content, runs)
        if found:
            yield found

    @staticmethod
    def _kept_links(children, content: str, offset: int) -> set[int]:
        """The link tokens (open and close) whose text is kept: autolinks, and references whose
        text is their label."""
        kept, stack = set(), []
        for token in children:
            if token.type == "link_open":
                stack.append(token)
            elif token.type == "link_close" and stack:
                opener = stack.pop()
                if opener.markup == "autolink" or _label_is_target(content, token.meta["at"] + offset):
                    kept.update((id(opener), id(token)))
        return kept

    def _image_label_is_target(self, content: str, at: int) -> bool:
        state = StateInline(content, self.parser, {}, [])
        end = self.parser.helpers.parseLinkLabel(state, at + 1, False)
        return end < 0 or _label_is_target(content, end)

    def _segment(self, block: _Block, content: str, runs: list[list]) -> tuple[Segment, list] | None:
        pieces, spans, joins, previous_end = [], [], [], None
        for start, end, text in runs:
            raw = content[start:end]
            # Space at either end is verbatim (escapes and entities never start with one): it
            # stays outside the piece, next to the markup it separates.
            lead, trail = len(raw) - len(raw.lstrip()), len(raw) - len(raw.rstrip())
            if lead == len(raw):
                continue
            start, end, text = start + lead, end - trail, text[lead:len(text) - trail]
            source, last = block.source(start), block.source(end - 1)
            if source is None or last is None or last - source != end - 1 - start:
                raise _Unplaced
            if previous_end is not None:
                joins.append(" " if any(ch.isspace() for ch in content[previous_end:start]) else "")
            line = block.lines[block.line_of(start)]
            pieces.append(Piece(source, last + 1, text))
            spans.append(not content[line.content_start:start].strip())
            previous_end = end
        segment = Segment(pieces, joins) if pieces else None
        if segment is None or not worth_translating(segment.text):
            return None
        return segment, spans

    def rebuild(self, translations: list[str], target_lang: str | None = None) -> bytes:
        replacements = []
        for segment, spans, translation in zip(self.segments, self.spans, translations):
            for piece, starts_line, part in zip(segment.pieces, spans, distribute(segment, translation)):
                if part != piece.text:
                    replacements.append((piece.start, piece.end,
                                         escape(part, starts_line, self.text[piece.start:piece.end], self.references)))
        return (self.bom + replace_pieces(self.text, replacements)).encode("utf-8")


def _literal(raw: str) -> set[str]:
    """The punctuation a piece's source has as plain text: not after a backslash, and not one that
    starts an escape, an entity, HTML or code."""
    if "\\" not in raw:
        return set(raw) - set("&<")
    literal, i = set(), 0
    while i < len(raw):
        if raw[i] == "\\":
            i += 2
            continue
        literal.add(raw[i])
        i += 1
    return literal - set("\\&<")


def _written_as(references: dict) -> dict[int, str]:
    """The characters written as the source wrote them, and the control characters as references."""
    return {ord(ch): written for ch, written in [*references.items(), *CONTROL_REFERENCES.items()]}


def escape(text: str, starts_line: bool, source: str = "", references: dict | None = None) -> str:
    """`text` written so that Markdown reads it as text. A character the source piece (`source`)
    already had as plain text stays as it was: it was text there (a balanced `[...]` in a link's
    label, a lone `*`), and escaping it could change how the brackets around it pair up."""
    present = set(text)
    rewritten = references is not None and not present.isdisjoint(references)
    if SPECIAL.isdisjoint(present) and not rewritten and not (starts_line and text[:1].isdigit()):
        return text  # the usual case: nothing Markdown would read as markup
    needed = present & ESCAPED
    if needed - ALWAYS_ESCAPED:
        needed -= _literal(source) - ALWAYS_ESCAPED
    head = ""
    if starts_line:  # what would open a block at the start of a line: a heading, a list, a quote
        digits = len(text) - len(text.lstrip("0123456789"))
        if digits and text[digits:digits + 1] in (".", ")"):
            head, text = text[:digits] + "\\" + text[digits], text[digits + 1:]
        elif text[:1] in LINE_START_ESCAPED and text[:1] not in needed and text[:1] not in (references or {}):
            head, text = "\\" + text[0], text[1:]
    if rewritten or not CONTROL_CHARACTERS.isdisjoint(present):
        table = {ord(ch): "\\" + ch for ch in needed}
        return head + text.translate({**table, **_written_as(references or {})})
    for ch in sorted(needed, key=lambda ch: ch != "\\"):  # backslashes first: none is escaped twice
        text = text.replace(ch, "\\" + ch)
    return head + text
