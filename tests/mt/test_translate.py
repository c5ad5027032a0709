import pytest
import torch

from pipeline import Translator
from pipeline.mt.backends import TransformersMTBackend
from pipeline.mt.translator import MAX_SENTENCE_TOKENS, output_bound


class RecordingBackend:
    """The real backend, recording the source rows it is given."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.rows: list[list[int]] = []

    def generate(self, batch, max_new_tokens, num_beams):
        self.rows.extend(batch)
        return self.backend.generate(batch, max_new_tokens, num_beams)


def fresh(translator: Translator) -> Translator:
    """The same loaded model behind a new Translator, with an empty in-process memory and a
    backend that records its rows."""
    return Translator(translator.model, translator.tokenizer, RecordingBackend(translator.backend),
                      name=translator.name, target_lang=translator.target_lang, num_beams=translator.num_beams)


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
    together = fresh(ja_en).translate(sentences)
    alone = [fresh(ja_en).translate([s])[0] for s in sentences]   # fresh: no memory of the batch
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
    sentences = [f"{n}月に金利が上がると、企業は投資を減らします。" for n in range(80)]
    long_text = "".join(sentences)
    assert len(ja_en.tokenizer(long_text)["input_ids"]) > 512
    translator = fresh(ja_en)
    out = translator.translate([long_text])[0]
    assert out  # translated, not refused
    # 80 sentences went through, each read whole and bounded on its own
    assert len(translator.backend.rows) == 80
    assert all(len(row) <= MAX_SENTENCE_TOKENS + 1 for row in translator.backend.rows)


def test_one_over_long_sentence_is_cut_to_fit(ja_en):
    sentence = "、".join(["金利が上がる"] * 200) + "。"
    translator = fresh(ja_en)
    assert translator.translate([sentence])[0]
    pieces = translator.backend.rows
    assert len(pieces) > 1 and all(len(p) - 1 <= MAX_SENTENCE_TOKENS for p in pieces)   # - 1: </s>


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

