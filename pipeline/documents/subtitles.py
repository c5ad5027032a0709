"""SRT and WebVTT: each cue's text is one segment; numbers, timings, cue settings, identifiers,
NOTE/STYLE/REGION blocks, styling tags and every line break are kept.

Both formats are blocks of lines separated by blank lines; the tokenizer below follows them as
written (SubRip's de-facto format; WebVTT's file and cue-text parsing rules), over the decoded text
with its own line endings, so untouched bytes are never rewritten. (The `srt` and `webvtt-py`
packages re-compose the file from parsed cues, which normalises timings and spacing.) In a cue's
text, `<...>` tags (and SubRip's `{\\an8}`-style overrides) are never pieces; the text between them,
over all the cue's lines, is, so a two-line cue is translated as one sentence and cut back into
its lines.
"""

from __future__ import annotations

import html

from pipeline.documents.segments import Segment, distribute, from_runs, replace_pieces
from pipeline.errors import DocumentError


def lines_of(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line without its ending (\\n, \\r\\n or \\r)."""
    lines, start, i = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            lines.append((start, i))
            i += 2 if ch == "\r" and text[i + 1:i + 2] == "\n" else 1
            start = i
        else:
            i += 1
    if start < len(text):
        lines.append((start, len(text)))
    return lines


def _blocks(text: str, lines: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Runs of non-blank lines."""
    blocks, current = [], []
    for start, end in lines:
        if text[start:end].strip():
            current.append((start, end))
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _timestamp(text: str, vtt: bool) -> bool:
    """[hh:]mm:ss.ttt (WebVTT) or hh:mm:ss,ttt (SubRip; a '.' is accepted too)."""
    head, sep, millis = text.replace(",", ".").rpartition(".")
    fields = head.split(":")
    if not sep or len(millis) != 3 or not millis.isdigit() or len(fields) not in ((2, 3) if vtt else (3,)):
        return False
    return all(field.isdigit() and field.isascii() for field in fields) and all(len(f) == 2 for f in fields[-2:])


def _is_timing(line: str, vtt: bool) -> bool:
    start, arrow, rest = line.partition("-->")
    end = rest.split()[0] if rest.split() else ""
    return bool(arrow) and _timestamp(start.strip(), vtt) and _timestamp(end, vtt)


def _cue_runs(text: str, start: int, end: int, srt: bool) -> list[tuple[int, int, str]]:
    """The text runs of one cue line: what lies outside `<...>` tags (and `{...}` overrides)."""
    runs, i, run_start = [], start, start
    while i < end:
        closer = {"<": ">", "{": "}"}.get(text[i]) if text[i] == "<" or (srt and text[i] == "{") else None
        if closer:
            close = text.find(closer, i, end)
            if close < 0:
                break
            if run_start < i:
                runs.append((run_start, i))
            i = run_start = close + 1
        else:
            i += 1
    if run_start < end:
        runs.append((run_start, end))
    decode = (lambda raw: raw) if srt else html.unescape
    return [(a, b, decode(text[a:b])) for a, b in runs]


def references_in(raw: str) -> dict[str, str]:
    """Each character a cue writes as a character reference (`&nbsp;`, `&#8212;`) -> how it is written."""
    found, at = {}, raw.find("&")
    while at >= 0:
        end = raw.find(";", at, at + 40)
        if end < 0:
            break
        reference = raw[at:end + 1]
        character = html.unescape(reference)
        if character != reference and len(character) == 1:
            found.setdefault(character, reference)
        at = raw.find("&", at + 1)
    return found


class SubtitleDocument:
    def __init__(self, text: str, fmt: str):
        self.fmt = fmt
        self.bom = "\ufeff" if text.startswith("\ufeff") else ""
        self.text = text[len(self.bom):]
        self.segments: list[Segment] = []
        self.references = {} if fmt == "srt" else references_in(self.text)
        blocks = _blocks(self.text, lines_of(self.text))
        if fmt == "vtt":
            self._check_header(blocks)
            blocks = blocks[1:]
        for block in blocks:
            text_lines = self._cue_text(block)
            runs = [run for start, end in text_lines for run in _cue_runs(self.text, start, end, fmt == "srt")]
            segment = from_runs(runs, self.text)
            if segment is not None:
                self.segments.append(segment)

    def _check_header(self, blocks) -> None:
        first = self.text[blocks[0][0][0]:blocks[0][0][1]] if blocks else ""
        if not first.startswith("WEBVTT") or first[6:7] not in ("", " ", "\t"):
            raise DocumentError("not a WebVTT file: it must begin with a WEBVTT line")

    def _cue_text(self, block: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The lines of a block that are cue text (none for a NOTE, STYLE or REGION block)."""
        line = [self.text[start:end] for start, end in block]
        if self.fmt == "vtt":
            if line[0].split(maxsplit=1)[0] in ("NOTE", "STYLE", "REGION") and "-->" not in line[0]:
                return []
            timing = 0 if "-->" in line[0] else 1
            if len(line) <= timing or not _is_timing(line[timing], True):
                return []  # WebVTT's parser drops a block that holds no cue
            return block[timing + 1:]
        where = f"the cue at line {self.text.count(chr(10), 0, block[0][0]) + 1}"
        if not line[0].strip().isdigit():
            raise DocumentError(f"not an SRT file: {where} does not start with its number")
        if len(line) < 2 or not _is_timing(line[1], False):
            raise DocumentError(f"not an SRT file: {where} has no timing line (00:00:01,000 --> 00:00:02,000)")
        return block[2:]

    def _escape(self, text: str) -> str:
        text = html.escape(text, quote=False)
        for character, reference in self.references.items():
            if character not in "&<>":
                text = text.replace(character, reference)
        return text

    def rebuild(self, translations: list[str], target_lang: str | None = None) -> bytes:
        replacements = []
        for segment, translation in zip(self.segments, translations):
            for piece, part in zip(segment.pieces, distribute(segment, translation)):
                if part != piece.text:
                    part = " ".join(part.splitlines())  # a line break would end the cue
                    replacements.append((piece.start, piece.end, part if self.fmt == "srt" else self._escape(part)))
        return (self.bom + replace_pieces(self.text, replacements)).encode("utf-8")
