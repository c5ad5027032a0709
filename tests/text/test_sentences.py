from pipeline.text.sentences import SentenceRun, plan_text, rebuild, sentences_of, split_sentences, split_to_fit


def test_english_sentences_split_at_end_punctuation_but_not_abbreviations():
    text = "Rates rose by 0.5 points. Mr. Smith said e.g. bonds fell! Did they? Yes."
    assert split_sentences(text) == [
        "Rates rose by 0.5 points.", "Mr. Smith said e.g. bonds fell!", "Did they?", "Yes.",
    ]


def test_japanese_sentences_split_without_spaces():
    assert split_sentences("金利が上がります。企業は投資を減らします！本当？はい") == [
        "金利が上がります。", "企業は投資を減らします！", "本当？", "はい",
    ]


def test_identity_translation_rebuilds_the_text_exactly():
    text = ("Intro line. Second.\n\n1. First point.\n- Use `print(x)` here.\n"
            "```python\ndef f(x):\n    return x. Not prose.\n```\n  * nested item\n\nEnd")
    layout = plan_text(text)
    english_joined = rebuild(layout, sentences_of(layout), "en")
    assert english_joined == text


def test_code_blocks_and_inline_code_are_not_sent_for_translation():
    layout = plan_text("Call `fetch()` now.\n```\nx = 1. y = 2.\n```\n")
    sentences = sentences_of(layout)
    assert all("fetch()" not in s and "x = 1" not in s for s in sentences)
    assert "```\nx = 1. y = 2.\n```" in layout


def test_list_markers_and_blank_lines_survive_translation():
    layout = plan_text("Points:\n\n- one.\n- two.\n3.5% is not a list.")
    out = rebuild(layout, [f"<{s}>" for s in sentences_of(layout)], "ja")
    assert out == "<Points:>\n\n- <one.>\n- <two.>\n<3.5% is not a list.>"


def test_japanese_target_joins_sentences_without_spaces():
    layout = plan_text("One. Two.")
    assert layout == [SentenceRun(["One.", "Two."])]
    assert rebuild(layout, ["一。", "二。"], "ja") == "一。二。"
    assert rebuild(layout, ["One.", "Two."], "en") == "One. Two."


def test_over_long_sentence_is_split_into_pieces_that_fit_and_lose_nothing():
    sentence = ", ".join(f"clause number {i} about interest" for i in range(60))
    pieces = split_to_fit(sentence, 40, lambda s: len(s.split()))
    assert len(pieces) > 1
    assert all(len(p.split()) <= 40 for p in pieces)
    assert " ".join(pieces).split() == sentence.split()


def test_unbroken_text_is_split_anywhere_rather_than_truncated():
    text = "x" * 1000
    pieces = split_to_fit(text, 100, len)
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
