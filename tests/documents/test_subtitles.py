"""SRT and WebVTT keep numbers, timings, settings, tags and blank lines; a cue is one text."""

from __future__ import annotations

import pytest

from pipeline.documents.subtitles import SubtitleDocument
from pipeline.errors import DocumentError

from corpus import SRT, VTT, subtitle_documents
from translators import Identity, Tagged, Upper, round_trip

DOCUMENTS = subtitle_documents()


def without_cue_text(text: str, fmt: str) -> list[str]:
    """Every line that is not cue text: numbers, timings, headers, notes, blank lines."""
    lines = text.splitlines()
    return [line for line in lines if not line or "-->" in line or line.strip().isdigit()
            or line.startswith(("WEBVTT", "NOTE", "STYLE", "Kind:", "::cue", "This note", "intro"))]


@pytest.mark.parametrize("name,fmt,source", DOCUMENTS, ids=[name for name, _, _ in DOCUMENTS])
def test_an_identity_translation_gives_the_file_back_byte_for_byte(name, fmt, source):
    _, output = round_trip(SubtitleDocument, source, Identity(), fmt)
    assert output == source.encode()


@pytest.mark.parametrize("name,fmt,source", DOCUMENTS, ids=[name for name, _, _ in DOCUMENTS])
def test_upper_casing_changes_only_the_cue_text(name, fmt, source):
    _, output = round_trip(SubtitleDocument, source, Upper(), fmt)
    text = output.decode()
    assert without_cue_text(text, fmt) == without_cue_text(source, fmt)
    assert text.upper() == source.upper().replace("&AMP;", "&AMP;")
    assert len(text.splitlines()) == len(source.splitlines())


def test_a_cue_of_two_lines_is_one_text_and_its_tags_stay():
    translator = Identity()
    round_trip(SubtitleDocument, SRT, translator, "srt")
    assert translator.seen[0] == "Hello there, my friend!"
    assert "1984" not in translator.seen and "Look up at the sky." in translator.seen
    _, output = round_trip(SubtitleDocument, SRT, Tagged(), "srt")
    text = output.decode()
    assert "<i>" in text and "</i>" in text and "{\\an8}⟦Look up" in text and '<font color="#ffff00">' in text
    assert "00:00:04,000 --> 00:00:06,000 X1:40 X2:600 Y1:20 Y2:50" in text


def test_webvtt_cue_text_is_decoded_for_the_translator_and_escaped_back():
    translator = Identity()
    _, output = round_trip(SubtitleDocument, VTT, translator, "vtt")
    assert "costs more & faster." in translator.seen[0] and "Fish <and> chips\xa0tonight" in translator.seen
    _, output = round_trip(SubtitleDocument, VTT, Upper(), "vtt")
    assert "FISH &lt;AND&gt; CHIPS" in output.decode() and "<v Roger Bingham>WHEN" in output.decode()
    assert "This note is kept as it is." in output.decode() and "<00:00:05.500>COMPANIES" in output.decode()


@pytest.mark.parametrize("source,fmt,fragment", [
    ("hello\n00:00:01,000 --> 00:00:02,000\nHi\n", "srt", "does not start with its number"),
    ("1\n00:00:01 --> 00:00:02\nHi\n", "srt", "no timing line"),
    ("00:01.000 --> 00:02.000\nHi\n", "vtt", "WEBVTT"),
])
def test_a_file_that_is_not_a_subtitle_file_is_refused_in_one_line(source, fmt, fragment):
    with pytest.raises(DocumentError, match=fragment):
        SubtitleDocument(source, fmt)
