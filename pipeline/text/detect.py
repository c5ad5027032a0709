"""Stage 1: which language is the question in?

The script decides first, because it is certain where statistics are not: kana means Japanese,
Hangul means Korean. Text of kanji alone is the hard case: Chinese must never reach the Japanese
model, so characters that exist only in Chinese (simplified or traditional) or only in Japanese
(shinjitai) are counted, and a tie goes to langdetect. Everything else goes to langdetect, seeded so
the same text always gets the same answer.
"""

from __future__ import annotations

import re

from pipeline.errors import EmptyInputError, UnsupportedLanguageError

SUPPORTED_LANGUAGES = ("ja", "en")

KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LETTER = re.compile(r"[^\W\d_]")

# Forms that differ between Japanese (shinjitai) and Chinese, and common Chinese function words
# that Japanese does not write in kanji.
JAPANESE_ONLY = set("円経済説価売実図関気広変対応為転込払辺従権帰県様歩戦浜沢駅験険銭鉄剤弐")
CHINESE_ONLY = set(
    "们这个说时为还进来过对会发经现样种么动应关点东车书长门问间见话让语认识头实题产业从开气报选条边传"
    "资际战几贷银额币险汇价货买卖钱铁济场员义务网络电视线级读写该这样吗呢吧您她没很"
    "們這個說時為還進來過對會發經現樣種麼動應關點東車書長門問間見話讓語認識頭實題產業從開氣報選條邊傳"
    "資際戰幾貸銀額幣險匯價貨買賣錢鐵濟場員義務網絡電視線級讀寫該嗎"
)
# langdetect is unreliable on a few Latin words; such text is taken as English.
SHORT_LATIN_WORDS = 3


def _seeded_langdetect():
    # Imported here so the package imports without it on machines that only run a model stage.
    from langdetect import DetectorFactory, detect_langs

    DetectorFactory.seed = 0
    return detect_langs


def _kanji_only_language(text: str) -> str | None:
    chinese = sum(ch in CHINESE_ONLY for ch in text)
    japanese = sum(ch in JAPANESE_ONLY for ch in text)
    if chinese != japanese:
        return "zh" if chinese > japanese else "ja"
    return None


def _statistical_language(text: str) -> str:
    from langdetect.lang_detect_exception import LangDetectException

    try:
        candidates = _seeded_langdetect()(text)
    except LangDetectException:
        return "unknown"
    for candidate in candidates:
        if candidate.lang == "en" and candidate.prob >= 0.3:
            return "en"
    return candidates[0].lang.split("-")[0]  # "zh-cn" -> "zh"


def detect_language(text: str) -> str:
    """The ISO 639-1 code of `text`'s language ("ja", "en", "zh", "ko", ...); "unknown" if none."""
    if not text or not text.strip():
        raise EmptyInputError("the text is empty: type a question in Japanese or English")
    if KANA.search(text):
        return "ja"
    if HANGUL.search(text):
        return "ko"
    if HAN.search(text):
        return _kanji_only_language(text) or _statistical_language(text)
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
        " if it is one of those, pass --source-lang ja or --source-lang en"
    )
