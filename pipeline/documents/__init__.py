"""Documents translated keeping everything but the words: Markdown, HTML, SRT, WebVTT, Word.

Each format's module parses a document into segments (segments.py: the texts to translate and
where their pieces sit in the source) and rebuilds it from their translations; the job that
translates the segments exactly once lives in jobs/documents.py.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from pipeline.documents.segments import Segment
from pipeline.errors import DocumentError

FORMATS = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".srt": "srt", ".vtt": "vtt",
           ".docx": "docx"}
FORMAT_CHOICES = ("md", "html", "srt", "vtt", "docx")


class Document(Protocol):
    segments: list[Segment]

    def rebuild(self, translations: list[str], target_lang: str | None = None) -> bytes: ...


def format_of(path: str | Path, forced: str | None = None) -> str | None:
    """The document format of `path` (`forced` if given), or None for a file of rows."""
    if forced is not None:
        if forced not in FORMAT_CHOICES:
            raise DocumentError(f"unknown document format '{forced}'; use one of {', '.join(FORMAT_CHOICES)}")
        return forced
    return FORMATS.get(Path(path).suffix.lower())


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DocumentError(f"the {what} is not valid UTF-8 (byte {error.start})") from None


@contextmanager
def collector_paused() -> Iterator[None]:
    """Parsing and rebuilding make many short-lived objects (a token per word of markup); in a
    process that holds a model, the cyclic collector would walk the model's objects again and again
    meanwhile, which costs more than the parse. Nothing made here is cyclic garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse(data: bytes, fmt: str) -> Document:
    """The document's segments, or a DocumentError that says in one line why it cannot be read."""
    with collector_paused():
        return _parse(data, fmt)


def rebuild(document: Document, translations: list[str], target_lang: str | None) -> bytes:
    with collector_paused():
        return document.rebuild(translations, target_lang)


def _parse(data: bytes, fmt: str) -> Document:
    if fmt == "md":
        from pipeline.documents.markdown import MarkdownDocument

        return MarkdownDocument(_utf8(data, "Markdown file"))
    if fmt == "html":
        from pipeline.documents.html import HtmlDocument

        return HtmlDocument(data)
    if fmt in ("srt", "vtt"):
        from pipeline.documents.subtitles import SubtitleDocument

        return SubtitleDocument(_utf8(data, "subtitle file"), fmt)
    if fmt == "docx":
        from pipeline.documents.docx import DocxDocument

        return DocxDocument(data)
    raise DocumentError(f"unknown document format '{fmt}'")
