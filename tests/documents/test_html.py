"""HTML keeps tags, attributes, scripts, styles, code, comments, entities and its encoding."""

from __future__ import annotations

import pytest

from pipeline.documents.html import HtmlDocument, attribute_spans

from corpus import HTML_PAGE, html_documents
from translators import Identity, Tagged, Upper, round_trip

DOCUMENTS = html_documents()


@pytest.mark.parametrize("name,source", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_an_identity_translation_gives_the_page_back_byte_for_byte(name, source):
    _, output = round_trip(HtmlDocument, source, Identity())
    assert output == source


@pytest.mark.parametrize("name,source", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_upper_casing_changes_only_text_and_readable_attributes(name, source):
    document, output = round_trip(HtmlDocument, source, Upper())
    assert len(output) == len(source) or document.encoding != "utf-8"
    text = source.decode(document.encoding)
    changed = [(a, b) for a, b in zip(text, output.decode(document.encoding)) if a != b]
    assert all(b == a.upper() for a, b in changed)
    assert changed or not any(ch.islower() for segment in document.segments for ch in segment.text)


def test_what_people_read_is_translated_and_nothing_else():
    translator = Identity()
    round_trip(HtmlDocument, HTML_PAGE.encode(), translator)
    seen = translator.seen
    for prose in ("Rates & Markets", "Home page", "Interest rates\xa0rise", "Read more about rates", "Home | About us",
                  "A chart of rates", "Search the site", "Run before you push.", "Five percent", "One © 2024"):
        assert prose in seen, prose
    joined = "\n".join(seen)
    for kept in ("font-family", "greeting", "navigation", "make test", "preformatted", "BrandName", "chart label",
                 "sans-serif", "title", "search"):
        assert kept not in joined, kept
    assert any(text.startswith("When rates go up, borrowing costs more for people and companies.") for text in seen)


def test_entities_and_the_lang_attribute():
    document = HtmlDocument(HTML_PAGE.encode())
    output = document.rebuild(Tagged().translate([s.text for s in document.segments]), "ja").decode()
    assert '<html lang="ja">' in output and "&nbsp;" in output and "&copy;" in output and "&#8212;" in output
    assert "<script>const greeting = \"<b>Hello</b> world\"; if (a < b && c > d) {}</script>" in output
    assert "href='/about?x=1&amp;y=2'" in output and "<!-- navigation: not translated -->" in output
    bare = HtmlDocument(b"<html><body><p>Hello</p></body></html>")
    assert bare.rebuild(["Bonjour"], "ja") == b'<html lang="ja"><body><p>Bonjour</p></body></html>'


def test_a_page_keeps_its_declared_encoding():
    latin = dict(DOCUMENTS)["latin-1"]
    document = HtmlDocument(latin)
    assert document.encoding == "iso8859-1"
    output = document.rebuild(["金利 " + s.text for s in document.segments])
    assert output.decode("latin-1").count("&#37329;&#21033;") == len(document.segments)
    assert "Crème".encode("latin-1") in output


def test_attribute_values_are_found_in_every_quoting_style():
    tag = """<input a=1 title='single' placeholder="double" aria-label=bare data-x = "spaced" disabled>"""
    spans = {name: tag[start:end] for name, start, end, _ in attribute_spans(tag)}
    assert spans == {"a": "1", "title": "single", "placeholder": "double", "aria-label": "bare",
                     "data-x": "spaced"}
