"""Stages 2 and 4, translation: `Translator` and the decoding backends behind it."""
