"""The text of a growing list of generated ids, without decoding the whole list at every token.

A stream shows an answer token by token, and decoding all the ids again at each one makes a long
answer's stream quadratic: 2,000 tokens took ~0.3 s of the server's event loop per answer (0.13 ms
a push at the end; benchmarks/stream_pieces.py); the engines' stop check decoded every row whole at
every step the same way. `GrowingText` keeps the text of a prefix of the ids and decodes only the ids
after it, which gives exactly `tokenizer.decode(ids, skip_special_tokens=...)` where a split is
provably harmless (the stream shows text without special tokens; the engines' stop check reads
them, an end-of-text marker among them):
- the tokenizer's decoder is byte-level (phi-2's family: GPT-2/CodeGen BPE), so the raw text of
  ids is the UTF-8 of their bytes joined, and a prefix whose bytes end on a whole character (its
  text does not end in U+FFFD) decodes the same alone as in front of the rest;
- where the tokenizer cleans up tokenisation spaces (" ." -> ".", " n't" -> "n't", ...), every
  pattern begins with a space, spans at most four characters and only removes spaces, so a prefix
  whose last three characters hold no space cannot take part in a pattern with what follows (its
  last space stays four or more characters from its end whatever the patterns before remove).
Any other tokenizer (sentencepiece's Metaspace decoder drops a leading space only at the start) is
decoded whole, as before.
"""

from __future__ import annotations

SPLIT_AFTER = 16  # ids decoded past the kept prefix before it may move up


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


class GrowingText:
    """decode(ids) for an id list that only grows (see the module docstring)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.splittable = _byte_level(tokenizer)
        self._cleanup: bool | None = None  # asked of the tokenizer at the first split (most checks never split)
        self._kept_ids = 0  # ids[:_kept_ids] are decoded once, into _kept_text
        self._kept_text = ""
        self._last_kept = None  # ids[_kept_ids - 1]: a list that did not grow from the kept one is decoded anew

    def text(self, ids) -> str:
        if not self.splittable:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip)
        if self._kept_ids and (len(ids) < self._kept_ids or ids[self._kept_ids - 1] != self._last_kept):
            self._kept_ids, self._kept_text = 0, ""
        newest = list(ids[self._kept_ids:])
        tail = self.tokenizer.decode(newest, skip_special_tokens=self.skip)
        if len(newest) >= SPLIT_AFTER and self._safe_end(newest, tail):
            self._kept_text += tail
            self._kept_ids, self._last_kept = len(ids), ids[-1]
            return self._kept_text
        return self._kept_text + tail

    @property
    def cleanup(self) -> bool:
        """Whether the tokenizer cleans up tokenisation spaces (so a split must keep clear of them)."""
        if self._cleanup is None:
            self._cleanup = self.splittable and _cleans_up(self.tokenizer)
        return self._cleanup

    def _safe_end(self, newest: list[int], tail: str) -> bool:
        """Whether the text decoded up to here ends where the next ids cannot change it."""
        if not tail or tail.endswith("\ufffd"):
            return False
        if not self.cleanup:
            return True
        raw = self.tokenizer.decode(newest, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
        return len(raw) >= 3 and " " not in raw[-3:]


def _cleans_up(tokenizer) -> bool:
    """Whether this tokenizer's decode cleans up tokenisation spaces (asked of it: transformers
    decides by tokenizer kind and version, not only by the config's flag)."""
    probe = tokenizer.encode("a . b", add_special_tokens=False)
    return tokenizer.decode(probe) != tokenizer.decode(probe, clean_up_tokenization_spaces=False)
