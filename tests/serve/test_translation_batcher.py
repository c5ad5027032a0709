"""The server's translation stage (serve/translation.py): its two lanes translate at once only where
the translator's backend allows two threads at once; the fast backend's graphs do not."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.mt.translator import Translator
from pipeline.serve.translation import TranslationBatcher

TOPICS = ["金利", "円安", "株と債券", "インフレ", "複利", "為替", "年金", "税金"]


def sentences(salt: str, count: int) -> list[str]:
    """Sentences no translation memory has seen (the memory would leave nothing to translate)."""
    return [f"{salt}{n}: {TOPICS[n % len(TOPICS)]}とは何ですか。" for n in range(count)]


class _Overlap:
    """Counts how many translate_ids calls are in flight at once (each held a little, so the lanes'
    calls meet if nothing keeps them apart)."""

    def __init__(self, translator):
        self.real, self.now, self.most, self.lock = translator.translate_ids, 0, 0, threading.Lock()
        translator.translate_ids = self

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.02)
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def both_lanes(batcher: TranslationBatcher, translator: Translator, salt: str):
    """A document (bulk lane: many rounds) and questions (quick lane) at once; each one's result."""
    document = translator.plan(sentences(f"{salt}d", 60)).ids
    questions = [translator.plan([text]).ids for text in sentences(f"{salt}q", 24)]
    assert len(document) > batcher.round_pieces and all(len(ids) == 1 for ids in questions)
    bulk = batcher.submit(document)
    quick = []
    for start in range(0, len(questions), batcher.round_pieces):  # bursts: rounds of the bulk lane's shape
        quick += [batcher.submit(ids) for ids in questions[start:start + batcher.round_pieces]]
        time.sleep(0.02)
    return (document, bulk.result(timeout=120)), [(ids, future.result(timeout=120)) for ids, future in zip(questions, quick)]


@pytest.fixture(scope="module")
def translator(tiny_ja_en_dir):
    return Translator.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers", num_beams=1)


@pytest.mark.parametrize("concurrent", [True, False])
def test_the_lanes_overlap_only_where_the_backend_takes_two_threads(translator, concurrent, monkeypatch):
    monkeypatch.setattr(translator.backend, "concurrent", concurrent, raising=False)
    overlap = _Overlap(translator)
    batcher = TranslationBatcher(translator, round_pieces=4)
    try:
        both_lanes(batcher, translator, f"c{concurrent}")
    finally:
        batcher.close()
        monkeypatch.setattr(translator, "translate_ids", overlap.real)
    assert overlap.most == (2 if concurrent else 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast backend's CUDA graphs need a GPU")
def test_on_the_fast_backend_both_lanes_at_once_translate_as_one_at_a_time(tiny_ja_en_dir):
    fast = Translator.from_pretrained(str(tiny_ja_en_dir), device="cuda", backend="fast", num_beams=1)
    assert fast.backend.concurrent is False
    batcher = TranslationBatcher(fast, round_pieces=4)
    try:
        for round_ in range(3):  # the second batch of a shape captures its graphs, the third replays them
            (document, got), questions = both_lanes(batcher, fast, f"r{round_}")
            assert got == fast.translate_ids(document)
            for ids, text in questions:
                assert text == fast.translate_ids(ids)
    finally:
        batcher.close()
