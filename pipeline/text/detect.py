"""Stage 1: which language is the question in?

The script decides first, because it is certain where statistics are not: kana means Japanese,
Hangul means Korean. Text of kanji alone is Japanese unless it holds a character Japanese does not
write: one outside JIS X 0208, the character set of Japanese (simplified forms such as 们 经 银), or
one of the traditional and Chinese-only forms that JIS X 0208 keeps only in its rare second level
(會 經 們 ...). Chinese must never reach the Japanese model, and no statistics can tell a two-kanji
term apart, so the rule is a fixed one. Text in no CJK script goes to langdetect, seeded so the same
text always gets the same answer; its answer counts only if the text holds that language's script.
"""

from __future__ import annotations

import re
import threading
import unicodedata

from pipeline.errors import EmptyInputError, UnsupportedLanguageError

SUPPORTED_LANGUAGES = ("ja", "en")


def other_language(language: str) -> str:
    """The other of the two languages the pipeline takes: the one a text in `language` is translated to.

    ja and en are fixed on purpose (phi-2 answers in English; its Japanese is MarianMT's), so the
    pair is two constants rather than a table of directions."""
    return "ja" if language == "en" else "en"

KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LETTER = re.compile(r"[^\W\d_]")

# Characters of JIS X 0208's second level (rare kanji, old forms) that Chinese writes and Japanese
# does not: traditional forms that Japanese replaced (會 -> 会), and simplified or colloquial
# Chinese characters that happen to be in JIS. Only second-level characters belong here: the first
# level is everyday Japanese (tests/text/test_detect.py checks it).
CHINESE_ONLY = set(
    "們來對會發經樣麼應關點讓實從氣條邊傳戰險匯價賣錢鐵濟讀寫國學體舊廣聲歸圖當黨權變斷繼續處擔單數"
    "樂藝顯驗爲與萬號區醫營寶亞惡壓圍圓聽戀齡滿榮縣勞專證擇澤譯驛雙總鬥覺觀勸盡蟲莊爭"
    "个从气几价网很"
)
# The first byte of a character's EUC-JP code tells the JIS X 0208 level: rows 16-47 are the first.
JIS_LEVEL_1 = range(0xB0, 0xD0)
JIS_LEVEL_2 = range(0xD0, 0xF5)

# langdetect's languages whose script is not Latin: an answer counts only if the text has its script.
SCRIPT_OF = {
    "ja": ("HIRAGANA", "KATAKANA", "CJK"), "zh": ("CJK",), "ko": ("HANGUL",),
    "ru": ("CYRILLIC",), "uk": ("CYRILLIC",), "bg": ("CYRILLIC",), "mk": ("CYRILLIC",),
    "ar": ("ARABIC",), "fa": ("ARABIC",), "ur": ("ARABIC",), "he": ("HEBREW",), "el": ("GREEK",),
    "th": ("THAI",), "hi": ("DEVANAGARI",), "mr": ("DEVANAGARI",), "ne": ("DEVANAGARI",),
    "bn": ("BENGALI",), "ta": ("TAMIL",), "te": ("TELUGU",), "kn": ("KANNADA",), "ml": ("MALAYALAM",),
    "gu": ("GUJARATI",), "pa": ("GURMUKHI",),
}
# langdetect is unreliable on a few Latin words; such text is taken as English.
SHORT_LATIN_WORDS = 3


def jis_level(character: str) -> int:
    """1 or 2 for a kanji of JIS X 0208's first or second level, 0 for one outside it."""
    try:
        code = character.encode("euc_jp")
    except UnicodeEncodeError:
        return 0
    if len(code) != 2:  # three bytes: JIS X 0212, the supplement of characters Japanese rarely needs
        return 0
    return 1 if code[0] in JIS_LEVEL_1 else 2 if code[0] in JIS_LEVEL_2 else 0


def is_chinese_only(character: str) -> bool:
    """A Han character that Chinese writes and Japanese does not."""
    return character in CHINESE_ONLY or jis_level(character) == 0


def _kanji_only_language(text: str) -> str:
    return "zh" if any(is_chinese_only(ch) for ch in HAN.findall(text)) else "ja"


def _scripts(text: str) -> set[str]:
    return {unicodedata.name(ch, "").split(" ")[0] for ch in LETTER.findall(text)}


_LANGDETECT = threading.Lock()


def langdetect_candidates(text: str) -> list:
    """langdetect's languages for `text`, most probable first, seeded: the same text, the same answer.

    One caller at a time: langdetect loads its profiles into one shared factory on first use, and a
    second thread that comes in meanwhile (a server's) gets a factory with some languages only: "pl"
    or "unknown" for plain English. Raises LangDetectException where it has no feature to go on."""
    # Imported here so the package imports without it on machines that only run a model stage.
    from langdetect import DetectorFactory, detect_langs

    with _LANGDETECT:
        DetectorFactory.seed = 0
        return detect_langs(text)


def _statistical_language(text: str) -> str:
    from langdetect.lang_detect_exception import LangDetectException

    try:
        candidates = langdetect_candidates(text)
    except LangDetectException:
        return "unknown"
    scripts = _scripts(text)
    for candidate in candidates:
        if candidate.lang == "en" and candidate.prob >= 0.3:
            return "en"
    for candidate in candidates:
        lang = candidate.lang.split("-")[0]  # "zh-cn" -> "zh"
        if scripts & set(SCRIPT_OF.get(lang, ("LATIN",))):
            return lang
    return "unknown"


def detect_language(text: str) -> str:
    """The ISO 639-1 code of `text`'s language ("ja", "en", "zh", "ko", ...); "unknown" if none."""
    if not text or not text.strip():
        raise EmptyInputError("the text is empty: type a question in Japanese or English")
    if KANA.search(text):
        return "ja"
    if HANGUL.search(text):
        return "ko"
    if HAN.search(text):
        return _kanji_only_language(text)
    letters = LETTER.findall(text)
    if not letters:
        return "unknown"
    if text.isascii() and len(text.split()) <= SHORT_LATIN_WORDS:
        return "en"
    return _statistical_language(text)


def require_supported(language: str) -> str:
    """`language` if the pipeline can take it, else an error that says how to force a language."""
    if language in SUPPORTED_LANGUAGES:
        return language
    raise UnsupportedLanguageError(
        f"the text looks like '{language}', but only Japanese (ja) and English (en) are supported;"
        " if it is one of those, pass --source-lang ja or --source-lang en",
        language,
    )
