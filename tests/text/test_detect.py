import pytest

from pipeline import detect_language
from pipeline.text.detect import CHINESE_ONLY, jis_level, require_supported
from pipeline.errors import EmptyInputError, UnsupportedLanguageError

# Terms a Japanese user types alone, written only in kanji: finance first, then daily life.
JAPANESE_KANJI_ONLY = [
    "金利", "債券", "金利上昇", "投資信託", "日本銀行", "株式市場", "為替", "円安", "円高", "株価", "国債",
    "社債", "預金", "貯金", "年金", "保険", "保険料", "不動産", "住宅", "住宅金融", "融資", "借金", "返済",
    "利息", "利回", "配当", "配当金", "証券", "証券会社", "信用取引", "外国為替", "物価", "物価上昇", "経済",
    "景気", "景気後退", "税金", "消費税", "所得税", "確定申告", "給料", "賞与", "残業代", "家計", "家計簿",
    "資産運用", "資産", "負債", "決算", "財務諸表", "会計", "監査", "銀行口座", "口座開設", "手数料", "金融政策",
    "中央銀行", "量的緩和", "日経平均", "東証", "上場", "新規上場", "時価総額", "円相場", "貿易収支", "国内総生産",
    "個人投資家", "機関投資家", "分散投資", "長期投資", "積立", "積立投資", "変動金利", "固定金利", "住宅価格",
    "電車", "天気", "病院", "郵便局", "買物", "駅前", "東京駅", "時間", "来年", "会社", "医者", "薬局", "家賃",
    "引越", "渋滞", "天気予報", "誕生日", "日本語", "東京都", "大阪", "京都", "地震", "台風", "入学試験",
]
# Chinese whose forms differ from Japanese: simplified characters, or traditional forms Japanese replaced.
# Chinese written only in forms Japanese shares (医院, 貨幣政策, 利率上升) is taken as Japanese: the ja->en
# model reads those characters as Japanese would, and no rule can tell such a term apart.
CHINESE = [
    "利率上升会如何影响个人和企业的经济活动？", "利率上升會如何影響個人和企業的經濟活動？",
    "人民银行", "外汇", "股票市场", "证券", "证券公司", "通货膨胀", "银行贷款", "汇率", "经济增长", "货币政策",
    "债券", "国债收益率", "房价", "买房", "贷款利率", "投资基金", "这是什么", "我们", "你好吗", "谢谢",
    "火车站", "天气预报", "邮局", "经济", "證券", "我們", "國際", "學校", "會議", "經濟", "匯率",
    "房價", "買賣", "錢", "這個問題怎麼辦", "鐵路", "醫院", "讀書", "說話",
]


@pytest.mark.parametrize("text", [
    "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？",
    "インフレとは何ですか",
    "日本の経済",
    *JAPANESE_KANJI_ONLY,
])
def test_japanese_is_detected_as_ja(text):
    assert detect_language(text) == "ja"


@pytest.mark.parametrize("text", CHINESE)
def test_chinese_whose_forms_differ_from_japanese_is_zh(text):
    assert detect_language(text) == "zh"


@pytest.mark.parametrize("text", [
    "How do rising interest rates affect households and companies?",
    "What is inflation?",
    "Hi",
])
def test_english_is_detected_as_en(text):
    assert detect_language(text) == "en"


@pytest.mark.parametrize("text,lang", [
    ("금리가 오르면 기업에 어떤 영향을 줍니까?", "ko"),
    ("Comment la hausse des taux d'intérêt affecte-t-elle les entreprises?", "fr"),
    ("Как повышение процентных ставок влияет на компании?", "ru"),
])
def test_other_languages_are_named_not_mistaken_for_japanese(text, lang):
    assert detect_language(text) == lang


@pytest.mark.parametrize("text", [
    *JAPANESE_KANJI_ONLY[:20], *CHINESE[:10], "Zinsen Anleihen Aktien Dividende Inflation", "ä ö ü ß é è",
    "Qu'est-ce qu'une obligation d'État à taux fixe", "1234 ???", "✓✓✓ →→ ★",
])
def test_no_language_is_named_whose_script_is_absent(text):
    lang = detect_language(text)
    if lang == "ko":
        assert any("\uac00" <= ch <= "\ud7af" for ch in text)
    if lang in ("ja", "zh"):
        assert any("\u3040" <= ch <= "\u9fff" for ch in text)
    if lang not in ("ja", "zh", "ko", "unknown"):
        assert any(ch.isalpha() and ch.isascii() or "LATIN" in __import__("unicodedata").name(ch, "")
                   for ch in text if ch.isalpha()) or lang in ("ru", "uk", "bg", "mk")


def test_chinese_only_list_holds_no_everyday_japanese_character():
    """Everyday Japanese is JIS X 0208's first level; the list may hold only rarer characters."""
    assert all(jis_level(ch) == 2 for ch in CHINESE_ONLY), [ch for ch in CHINESE_ONLY if jis_level(ch) != 2]
    assert not CHINESE_ONLY & set("個時東間銀来会説価売実円経済")


def test_jis_levels_of_known_characters():
    assert jis_level("金") == 1 and jis_level("經") == 2 and jis_level("们") == 0 and jis_level("a") == 0


def test_detection_is_deterministic():
    text = "Wie wirken sich steigende Zinsen auf Unternehmen aus?"
    assert len({detect_language(text) for _ in range(5)}) == 1


def test_empty_text_is_refused():
    with pytest.raises(EmptyInputError):
        detect_language("  \n ")


def test_unsupported_language_error_says_how_to_force():
    with pytest.raises(UnsupportedLanguageError, match="--source-lang"):
        require_supported("zh")
