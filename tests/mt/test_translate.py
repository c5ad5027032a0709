import pytest
import torch

from pipeline import Translator
from pipeline.mt.backends import TransformersMTBackend
from pipeline.mt.translator import MAX_SENTENCE_TOKENS, output_bound


@pytest.fixture(scope="module")
def ja_en(tiny_ja_en_dir):
    return Translator.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers", num_beams=1)


@pytest.fixture(scope="module")
def en_ja(tiny_en_ja_dir):
    return Translator.from_pretrained(str(tiny_en_ja_dir), device="cpu", backend="transformers", num_beams=1)


def test_translator_loads_published_marian_format_and_translates(ja_en):
    out = ja_en.translate(["金利が上がります。", "円安は輸出に有利です。"])
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert ja_en.target_lang == "en"


def test_each_sentence_translates_as_it_would_alone(ja_en):
    """Batching and length sorting must not change or reorder any sentence's translation."""
    sentences = ["金利が上がります。", "これはペンです。", "円安", "東京の株式市場は午後に少し下がりました。"]
    together = ja_en.translate_sentences(sentences)
    alone = [ja_en.translate_sentences([s])[0] for s in sentences]
    assert together == alone


def test_paragraphs_lists_and_code_keep_their_shape(en_ja):
    text = "Rates rise. Firms wait.\n\n- Save more.\n- Spend less.\n```\nx = 1\n```\nUse `f()` daily."
    out = en_ja.translate([text])[0]
    assert out.count("\n\n") >= 1
    assert "\n- " in out and out.startswith(out.split("\n")[0])
    assert "```\nx = 1\n```" in out and "`f()`" in out


def test_empty_and_blank_texts_stay_as_they_are(ja_en):
    assert ja_en.translate(["", "  ", "\n"]) == ["", "  ", "\n"]


def test_output_length_is_bounded_by_input_length(ja_en):
    ids = ja_en.tokenizer(["金利"])["input_ids"]
    out = ja_en.backend.generate(ids, output_bound(len(ids[0])), 1)
    assert len(out[0]) <= output_bound(len(ids[0]))


def test_long_text_is_split_into_sentences_not_cut_at_512_tokens(ja_en):
    long_text = "金利が上がると、企業は投資を減らします。" * 80
    assert len(ja_en.tokenizer(long_text)["input_ids"]) > 512
    out = ja_en.translate([long_text])[0]
    assert out  # translated, not refused
    # 80 sentences went through, each bounded: far more output than one 512-token window allows
    assert len(ja_en.plan_sentences(long_text)) == 80


def test_one_over_long_sentence_is_cut_to_fit(ja_en):
    sentence = "、".join(["金利が上がる"] * 200) + "。"
    pieces = ja_en.plan_sentences(sentence)
    assert len(pieces) > 1 and all(ja_en.count_tokens(p) <= MAX_SENTENCE_TOKENS for p in pieces)


def test_transformers_backend_matches_plain_generate(tiny_ja_en_dir):
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(tiny_ja_en_dir).eval()
    backend = TransformersMTBackend(model)
    ids = [[5, 6, 7, 0], [9, 10, 0]]
    expected = []
    for row in ids:
        out = model.generate(torch.tensor([row]), max_new_tokens=13, max_length=None, num_beams=1,
                             do_sample=False)[0].tolist()
        expected.append([t for t in out[1:] if t not in (0, model.config.pad_token_id)][:12])
    assert backend.generate(ids, 12, 1) == expected

