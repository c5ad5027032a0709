"""HTML: text and the attributes people read (alt, title, placeholder, aria-label) are translated;
tags, other attributes, script/style/code/pre, comments, entities and the encoding are kept.

The parser is the standard library's `html.parser`: an HTML tokenizer (tags, raw-text elements,
comments, character references) that reports where each token starts (`getpos`) and hands over
a start tag's source. A tree builder (html5lib, lxml) would give a tree to serialise again, which
rewrites quotes, entities and whitespace; here the bytes between the translated pieces are never
touched. Text separated only by inline tags (`<b>`, `<a>`, `<span>`...) is one segment, so a
sentence with a bold word is translated as one sentence. Attribute values are found in the start
tag's source by a scanner that follows HTML's attribute states.
"""

from __future__ import annotations

import codecs
import html
from html.parser import HTMLParser

from pipeline.documents.segments import Piece, Segment, distribute, from_runs, replace_pieces, worth_translating
from pipeline.errors import DocumentError

READ_ATTRIBUTES = {"alt", "title", "placeholder", "aria-label"}
KEPT_ELEMENTS = {"script", "style", "code", "pre", "template", "svg", "math"}
# Tags a sentence runs through; <code> and its kin are holes in it (kept, but the sentence goes on).
INLINE = {"a", "abbr", "b", "bdi", "bdo", "cite", "code", "data", "dfn", "em", "font", "i", "img", "kbd", "label",
          "mark", "q", "s", "samp", "small", "span", "strong", "sub", "sup", "time", "u", "var", "wbr"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


def attribute_spans(tag: str) -> list[tuple[str, int, int, str]]:
    """(name, start, end, quote) of each attribute value in a start tag's source."""
    spans, i, n = [], 1, len(tag)
    while i < n and tag[i] not in " \t\n\f\r/>":
        i += 1  # the tag name
    while i < n:
        while i < n and tag[i] in " \t\n\f\r/":
            i += 1
        if i >= n or tag[i] == ">":
            break
        name_start = i
        i += 1  # an attribute name may begin with '='
        while i < n and tag[i] not in " \t\n\f\r/>=":
            i += 1
        name = tag[name_start:i].lower()
        j = i
        while j < n and tag[j] in " \t\n\f\r":
            j += 1
        if j >= n or tag[j] != "=":
            continue
        j += 1
        while j < n and tag[j] in " \t\n\f\r":
            j += 1
        if j < n and tag[j] in "\"'":
            close = tag.find(tag[j], j + 1)
            close = n if close < 0 else close
            spans.append((name, j + 1, close, tag[j]))
            i = close + 1
        else:
            end = j
            while end < n and tag[end] not in " \t\n\f\r>":
                end += 1
            spans.append((name, j, end, ""))
            i = end
    return spans


class _Tokens(HTMLParser):
    """Every token with where it starts in the text: (kind, start, value)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=False)
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        self.tokens: list[tuple[str, int, object]] = []
        # A file that ends inside a tag: the parser would hand the unfinished tag over as text.
        tail = text.rfind("<")
        unfinished = tail >= 0 and text.find(">", tail) < 0 and _unfinished_markup(text[tail:])
        self.feed(text[:tail] if unfinished else text)
        self.close()
        if unfinished:
            self.tokens.append(("other", tail, None))

    def _at(self) -> int:
        line, column = self.getpos()
        return self.line_starts[line - 1] + column

    def handle_starttag(self, tag, attrs):
        self.tokens.append(("start", self._at(), (tag, dict(attrs), self.get_starttag_text())))

    def handle_startendtag(self, tag, attrs):
        self.tokens.append(("void", self._at(), (tag, dict(attrs), self.get_starttag_text())))

    def handle_endtag(self, tag):
        self.tokens.append(("end", self._at(), tag))

    def handle_data(self, data):
        self.tokens.append(("data", self._at(), data))

    def handle_entityref(self, name):
        self.tokens.append(("ref", self._at(), None))

    def handle_charref(self, name):
        self.tokens.append(("ref", self._at(), None))

    def handle_comment(self, data):
        self.tokens.append(("other", self._at(), None))

    handle_decl = handle_pi = unknown_decl = handle_comment


def sniff_encoding(data: bytes) -> str:
    """The document's encoding: its byte-order mark, else its <meta> charset, else UTF-8
    (windows-1252 where the bytes are not UTF-8, as browsers read such a page)."""
    for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return name
    head = _Tokens(data[:4096].decode("latin-1"))
    for kind, _, value in head.tokens:
        if kind in ("start", "void") and value[0] == "meta":
            attrs = {k: v or "" for k, v in value[1].items()}
            declared = attrs.get("charset") or _charset_of(attrs.get("content", "")) \
                if "charset" in attrs or attrs.get("http-equiv", "").lower() == "content-type" else None
            if declared:
                try:
                    return codecs.lookup(declared.strip()).name
                except LookupError:
                    raise DocumentError(f"the page declares an unknown encoding '{declared.strip()}'") from None
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "windows-1252"


def _unfinished_markup(raw: str) -> bool:
    return raw.startswith("<") and (raw[1:2].isalpha() or raw[1:2] in ("/", "!", "?"))


def _charset_of(content: str) -> str | None:
    for part in content.split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip("\"'")
    return None


class HtmlDocument:
    def __init__(self, data: bytes):
        self.encoding = sniff_encoding(data)
        try:
            self.text = data.decode(self.encoding)
        except UnicodeDecodeError as error:
            raise DocumentError(f"the page is not valid {self.encoding} (byte {error.start})") from None
        tokens = _Tokens(self.text).tokens
        self.entities: dict[str, str] = {}  # a character written as a reference -> how it was written
        self.segments: list[Segment] = []
        self.attribute: list[str] = []  # per segment: the quote of an attribute value, None for text
        self.html_tag: tuple[int, str] | None = None
        self._walk(tokens + [("other", len(self.text), None)])

    def _walk(self, tokens) -> None:
        stack: list[tuple[str, bool]] = []  # open elements, and whether each keeps its text
        runs: list[tuple[int, int, str]] = []
        for (kind, start, value), (_, end, _) in zip(tokens, tokens[1:]):
            keep = bool(stack) and stack[-1][1]
            if kind in ("data", "ref") and keep:
                continue
            if kind in ("data", "ref"):
                raw = self.text[start:end]
                text = raw if kind == "data" else html.unescape(raw)
                if kind == "ref" and text != raw:
                    self.entities.setdefault(text, raw)
                if runs and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], end, runs[-1][2] + text)
                else:
                    runs.append((start, end, text))
                continue
            if kind in ("start", "void", "end") and self._tag_name(value) in INLINE:
                if kind != "end":
                    self._attributes(start, value[2], value[0])
                if kind == "start" and value[0] not in VOID:
                    stack.append((value[0], keep or value[0] in KEPT_ELEMENTS))
                elif kind == "end":
                    self._close(stack, value)
                continue
            self._flush(runs)
            if kind in ("start", "void"):
                tag, attrs, source = value
                if not keep:
                    self._attributes(start, source, tag)
                kept = keep or tag in KEPT_ELEMENTS or attrs.get("translate", "").lower() == "no" \
                    or "notranslate" in (attrs.get("class") or "").split()
                if kind == "start" and tag not in VOID:
                    stack.append((tag, kept))
            elif kind == "end":
                self._close(stack, value)
        self._flush(runs)

    @staticmethod
    def _tag_name(value) -> str:
        return value if isinstance(value, str) else value[0]

    @staticmethod
    def _close(stack, tag: str) -> None:
        for depth in range(len(stack) - 1, -1, -1):
            if stack[depth][0] == tag:
                del stack[depth:]
                return

    def _flush(self, runs) -> None:
        segment = from_runs(runs, self.text)
        if segment is not None:
            self.segments.append(segment)
            self.attribute.append(None)
        runs.clear()

    def _attributes(self, at: int, source: str, tag: str) -> None:
        for name, start, end, quote in attribute_spans(source):
            if tag == "html" and name == "lang":
                self.html_tag = (at + start, at + end, quote)
            value = html.unescape(source[start:end])
            if name in READ_ATTRIBUTES and worth_translating(value):
                self.segments.append(Segment([Piece(at + start, at + end, value)]))
                self.attribute.append(quote)
        if tag == "html" and self.html_tag is None:
            self.html_tag = (at + 5, at + 5, None)  # no lang yet: one goes right after `<html`

    def _write(self, text: str, quote: str | None) -> str:
        if quote is None:
            text = html.escape(text, quote=False)
        else:
            text = text.replace("&", "&amp;").replace(quote or '"', "&quot;" if quote != "'" else "&#x27;")
        for character, reference in self.entities.items():
            if character not in "&<>\"'":
                text = text.replace(character, reference)
        return text if quote != "" else f'"{text}"'

    def rebuild(self, translations: list[str], target_lang: str | None = None) -> bytes:
        replacements = []
        for segment, quote, translation in zip(self.segments, self.attribute, translations):
            for piece, part in zip(segment.pieces, distribute(segment, translation)):
                if part != piece.text:
                    replacements.append((piece.start, piece.end, self._write(part, quote)))
        if target_lang and self.html_tag is not None:
            start, end, quote = self.html_tag
            if self.text[start:end] != target_lang:
                replacements.append((start, end, target_lang if quote else f' lang="{target_lang}"'
                                     if start == end else f'"{target_lang}"'))
        encoding = "utf-8" if self.encoding == "utf-8-sig" else self.encoding
        prefix = codecs.BOM_UTF8 if self.encoding == "utf-8-sig" else b""
        text = replace_pieces(self.text, replacements)
        return prefix + text.encode(encoding, errors="xmlcharrefreplace")
