import pytest

from pipeline import detect_language
from pipeline.text.detect import require_supported
from pipeline.errors import EmptyInputError, UnsupportedLanguageError


@pytest.mark.parametrize("text", [
    "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？",
    "インフレとは何ですか",
    "円安",  # kanji only, but 円 is written so only in Japanese
    "日本の経済",
])
def test_japanese_is_detected_as_ja(text):
    assert detect_language(text) == "ja"


@pytest.mark.parametrize("text", [
    "How do rising interest rates affect households and companies?",
    "What is inflation?",
    "Hi",
])
def test_english_is_detected_as_en(text):
    assert detect_language(text) == "en"


@pytest.mark.parametrize("text,lang", [
    ("利率上升会如何影响个人和企业的经济活动？", "zh"),
    ("利率上升會如何影響個人和企業的經濟活動？", "zh"),
    ("금리가 오르면 기업에 어떤 영향을 줍니까?", "ko"),
    ("Comment la hausse des taux d'intérêt affecte-t-elle les entreprises?", "fr"),
])
def test_other_languages_are_named_not_mistaken_for_japanese(text, lang):
    assert detect_language(text) == lang


def test_detection_is_deterministic():
    text = "Wie wirken sich steigende Zinsen auf Unternehmen aus?"
    assert len({detect_language(text) for _ in range(5)}) == 1


def test_empty_text_is_refused():
    with pytest.raises(EmptyInputError):
        detect_language("  \n ")


def test_unsupported_language_error_says_how_to_force():
    with pytest.raises(UnsupportedLanguageError, match="--source-lang"):
        require_supported("zh")
