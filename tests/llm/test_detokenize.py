"""GrowingText (llm/detokenize.py): the text of a growing id list equals decoding it whole, at every
length, while decoding only the newest ids."""

from __future__ import annotations

import copy
import random

import pytest
from transformers import AutoTokenizer

from pipeline.llm.answerer import AnswerPieces, Answerer
from pipeline.llm.detokenize import GrowingText

TEXTS = [
    "Interest rates rise when the central bank tightens . It don't matter , he said ' twice ' .",
    "金利が上昇すると、個人や企業の経済活動に影響を与えます。😀 Bonds aren't stocks !",
    "Exercise 3:\n\nQuestion: what's compound interest ? Answer: interest on interest ,  compounded.",
]


@pytest.fixture(scope="module")
def phi_tokenizer(tiny_phi2_dir):
    return AutoTokenizer.from_pretrained(tiny_phi2_dir)


def sequences(tokenizer, count: int = 40, length: int = 300):
    """Encoded texts, random ids (byte tokens that leave characters half written), end-of-text ids
    among them, and mixtures of these."""
    rng = random.Random(7)
    vocab = len(tokenizer)
    texts = [tokenizer.encode(text) for text in TEXTS]
    for index in range(count):
        ids: list[int] = []
        while len(ids) < length:
            kind = rng.random()
            if kind < 0.5:
                text = texts[rng.randrange(len(texts))]
                start = rng.randrange(len(text))
                ids += text[start:start + rng.randrange(1, 40)]
            elif kind < 0.9:
                ids += [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
            else:
                ids.append(tokenizer.eos_token_id)
        yield ids


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("cleanup", [False, True])
def test_the_text_at_every_length_equals_decoding_all_the_ids(phi_tokenizer, cleanup, skip):
    tokenizer = copy.deepcopy(phi_tokenizer)
    tokenizer.clean_up_tokenization_spaces = cleanup
    # transformers 5.24 ignores the flag for BPE tokenizers unless forced (older versions clean up)
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = cleanup
    growing = GrowingText(tokenizer, skip_special_tokens=skip)
    assert growing.splittable and growing.cleanup == cleanup
    for ids in sequences(tokenizer):
        growing = GrowingText(tokenizer, skip_special_tokens=skip)
        for end in range(1, len(ids) + 1):
            assert growing.text(ids[:end]) == tokenizer.decode(ids[:end], skip_special_tokens=skip), (ids[:end], end)


def test_a_list_that_did_not_grow_from_the_last_one_is_decoded_anew(phi_tokenizer):
    first, second = list(sequences(phi_tokenizer, count=2))
    growing = GrowingText(phi_tokenizer)
    for end in range(1, len(first) + 1):
        growing.text(first[:end])
    for end in (len(second), 5, 200):
        assert growing.text(second[:end]) == phi_tokenizer.decode(second[:end], skip_special_tokens=True)


def test_each_push_decodes_only_the_newest_ids(phi_tokenizer):
    """A 2,000-token answer: decoding every prefix whole would pass ~2 million ids to the decoder."""
    tokenizer = copy.deepcopy(phi_tokenizer)
    decoded = []
    original = tokenizer.decode

    def counting(ids, *args, **kwargs):
        decoded.append(len(ids))
        return original(ids, *args, **kwargs)

    tokenizer.decode = counting
    ids = (tokenizer.encode(" ".join(TEXTS[0::2])) * 200)[:2000]
    growing = GrowingText(tokenizer)
    for end in range(1, len(ids) + 1):
        growing.text(ids[:end])
    assert sum(decoded) < 40 * len(ids)


def test_a_tokenizer_that_is_not_byte_level_is_decoded_whole(tiny_ja_en_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_ja_en_dir)
    growing = GrowingText(tokenizer)
    assert not growing.splittable
    ids = tokenizer.encode("金利が上昇すると、影響があります。")
    for end in range(1, len(ids) + 1):
        assert growing.text(ids[:end]) == tokenizer.decode(ids[:end], skip_special_tokens=True)


@pytest.mark.parametrize("raw", [False, True])
def test_the_streamed_pieces_joined_are_the_finished_answer(phi_tokenizer, raw):
    question = "What is a bond?"
    for ids in sequences(phi_tokenizer, count=10, length=400):
        pieces = AnswerPieces(phi_tokenizer, question, raw)
        shown = "".join(pieces.push(token) for token in ids) + pieces.finish()
        whole = phi_tokenizer.decode(ids, skip_special_tokens=True)
        assert shown == Answerer.finish(whole, question, "", raw)[0]
