"""Word documents keep every part of the package and the formatting of every run."""

from __future__ import annotations

import io
import zipfile

import docx
import pytest

from pipeline.documents.docx import DocxDocument
from pipeline.errors import DocumentError

from corpus import docx_documents
from translators import Identity, Tagged, Upper, round_trip

DOCUMENTS = docx_documents()


def parts(data: bytes) -> list[tuple[str, bytes]]:
    package = zipfile.ZipFile(io.BytesIO(data))
    return [(info.filename, package.read(info)) for info in package.infolist()]


@pytest.mark.parametrize("name,source", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_an_identity_translation_keeps_every_part_byte_for_byte(name, source):
    _, output = round_trip(DocxDocument, source, Identity())
    assert parts(output) == parts(source)


def runs(data: bytes) -> list[tuple]:
    document = docx.Document(io.BytesIO(data))
    return [(p.style.name, [(r.bold, r.italic, r.style.name, r.text) for r in p.runs]) for p in document.paragraphs]


@pytest.mark.parametrize("name,source", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_upper_casing_changes_only_text_and_keeps_every_run(name, source):
    _, output = round_trip(DocxDocument, source, Upper())
    before, after = runs(source), runs(output)
    assert [(style, [r[:3] for r in rs]) for style, rs in after] == [(style, [r[:3] for r in rs]) for style, rs in before]
    assert [[r[3] for r in rs] for _, rs in after] == [[r[3].upper() for r in rs] for _, rs in before]
    unchanged = {name for name, data in parts(source)} - {"word/document.xml", "word/header1.xml",
                                                           "word/footer1.xml", "word/footnotes.xml"}
    assert {n: d for n, d in parts(output) if n in unchanged} == {n: d for n, d in parts(source) if n in unchanged}


def test_paragraphs_cells_headers_footers_and_footnotes_are_translated():
    translator = Identity()
    round_trip(DocxDocument, dict(DOCUMENTS)["report-with-footnotes"], translator)
    for text in ("Interest rates", "When rates go up, borrowing costs more for people and companies.",
                 "Read the full article online.", "Five percent", "Quarterly report", "Company confidential",
                 "A footnote that explains everything.", "Before a tab after the tab"):
        assert text in translator.seen, text
    _, output = round_trip(DocxDocument, dict(DOCUMENTS)["report-with-footnotes"], Tagged())
    document = docx.Document(io.BytesIO(output))
    assert document.sections[0].header.paragraphs[0].text.startswith("⟦")
    assert document.tables[0].cell(1, 1).text.startswith("⟦") and document.inline_shapes
    assert b"https://example.com/rates" in dict(parts(output))["word/_rels/document.xml.rels"]


def test_a_file_that_is_not_a_word_document_is_refused():
    with pytest.raises(DocumentError, match="not a readable Word document"):
        DocxDocument(b"PK\x03\x04 not really a zip")
