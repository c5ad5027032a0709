"""Translators the document tests use: anything with translate(texts) -> list of str will do."""

from __future__ import annotations


class Identity:
    def __init__(self):
        self.seen: list[str] = []

    def translate(self, texts: list[str]) -> list[str]:
        self.seen += texts
        return list(texts)


class Upper(Identity):
    def translate(self, texts: list[str]) -> list[str]:
        self.seen += texts
        return [text.upper() for text in texts]


class Tagged(Identity):
    """Wraps each text in ⟦ ⟧, and doubles it (a translation is seldom as long as its source)."""

    def translate(self, texts: list[str]) -> list[str]:
        self.seen += texts
        return [f"⟦{text} {text}⟧" for text in texts]


def round_trip(document_type, data, translator, *args):
    """The document rebuilt from the translator's translations of its segments."""
    document = document_type(data, *args)
    return document, document.rebuild(translator.translate([segment.text for segment in document.segments]))
