"""Word (.docx): the paragraphs of the body, table cells, headers, footers, footnotes and endnotes
are translated; styles, run formatting, links, images and every other part of the package are kept.

A .docx is a zip of XML parts; lxml reads the parts that hold text (found by their content type in
[Content_Types].xml, not by name) and every other part is copied as it was. A paragraph (`w:p`) is
one segment whose pieces are its `w:t` elements, so a sentence across a bold run is translated as
one sentence and the translation is cut back across the same runs: each run keeps its formatting,
hyperlinks keep their targets. A part nobody changed is written back as its original bytes.
"""

from __future__ import annotations

import io
import zipfile

from lxml import etree

from pipeline.documents.segments import Piece, Segment, distribute, worth_translating
from pipeline.errors import DocumentError

W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
CONTENT_TYPES = "http://schemas.openxmlformats.org/package/2006/content-types"
TEXT_PARTS = ("document.main+xml", "template.main+xml", "document.macroEnabled.main+xml", "header+xml",
              "footer+xml", "footnotes+xml", "endnotes+xml")
BREAKS = {f"{{{W}}}tab", f"{{{W}}}br", f"{{{W}}}cr"}


def _text_parts(package: zipfile.ZipFile) -> list[str]:
    try:
        types = etree.fromstring(package.read("[Content_Types].xml"))
    except KeyError:
        raise DocumentError("not a Word document: the package has no [Content_Types].xml") from None
    parts = [override.get("PartName", "").lstrip("/") for override in types.iter(f"{{{CONTENT_TYPES}}}Override")
             if override.get("ContentType", "").startswith("application/vnd.openxmlformats-officedocument"
                                                           ".wordprocessingml.")
             and override.get("ContentType", "").endswith(TEXT_PARTS)]
    if not any(types_end(types, part).endswith("main+xml") for part in parts):
        raise DocumentError("not a Word document: the package has no main document part")
    return parts


def types_end(types, part: str) -> str:
    for override in types.iter(f"{{{CONTENT_TYPES}}}Override"):
        if override.get("PartName", "").lstrip("/") == part:
            return override.get("ContentType", "")
    return ""


def _paragraph_of(element, paragraph_tag: str):
    parent = element.getparent()
    while parent is not None and parent.tag != paragraph_tag:
        parent = parent.getparent()
    return parent


class DocxDocument:
    def __init__(self, data: bytes):
        try:
            self.package = zipfile.ZipFile(io.BytesIO(data))
            self.trees = {}
            for name in _text_parts(self.package):
                if name in self.package.namelist():
                    self.trees[name] = etree.fromstring(self.package.read(name))
        except (zipfile.BadZipFile, etree.XMLSyntaxError, ValueError) as error:
            raise DocumentError(f"not a readable Word document ({error})") from None
        self.segments: list[Segment] = []
        self.places: list[tuple[str, list]] = []  # per segment: its part and its w:t elements
        for name, root in self.trees.items():
            for paragraph in root.iter(f"{{{W}}}p"):
                self._paragraph(name, paragraph)

    def _paragraph(self, part: str, paragraph) -> None:
        pieces, joins, elements, gap = [], [], [], False
        for element in paragraph.iter(f"{{{W}}}t", *BREAKS):
            if _paragraph_of(element, paragraph.tag) is not paragraph:
                continue  # a text box's own paragraph, taken on its own
            if element.tag in BREAKS:
                gap = True
                continue
            if not element.text:
                continue
            if pieces:
                joins.append(" " if gap else "")
            gap = False
            pieces.append(Piece(len(elements), len(elements) + 1, element.text))
            elements.append(element)
        segment = Segment(pieces, joins) if pieces else None
        if segment is not None and worth_translating(segment.text):
            self.segments.append(segment)
            self.places.append((part, elements))

    def rebuild(self, translations: list[str], target_lang: str | None = None) -> bytes:
        changed = set()
        for segment, (part, elements), translation in zip(self.segments, self.places, translations):
            for piece, element, text in zip(segment.pieces, elements, distribute(segment, translation, strip=False)):
                if text != piece.text:
                    element.text = text
                    if text != text.strip():
                        element.set(XML_SPACE, "preserve")
                    changed.add(part)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for info in self.package.infolist():
                data = self.package.read(info)
                if info.filename in changed:
                    data = etree.tostring(self.trees[info.filename], xml_declaration=True, encoding="UTF-8",
                                          standalone=True)
                target.writestr(info, data)
        return out.getvalue()
