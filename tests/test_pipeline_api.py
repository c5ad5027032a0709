"""The whole pipeline through the Python API, on tiny checkpoints of the published formats."""

import json

import pytest

from pipeline import BilingualQA, GenerationSettings, QAResult
from pipeline.errors import EmptyInputError, UnsupportedLanguageError

SETTINGS = GenerationSettings(max_new_tokens=16)
JA_QUESTION = "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？"


def test_japanese_question_gets_both_languages(qa):
    result = qa.ask(JA_QUESTION, settings=SETTINGS)
    assert isinstance(result, QAResult)
    assert result.source_lang == "ja"
    assert result.question_ja == JA_QUESTION  # the original, not a round trip
    assert result.question_en and result.answer_en and result.answer_ja
    assert result.question_en == qa.ja_en.translate([JA_QUESTION])[0]
    assert result.answer_ja == qa.en_ja.translate([result.answer_en])[0]


def test_english_question_is_kept_and_translated_to_japanese(qa):
    question = "How do rising interest rates affect companies?"
    result = qa.ask(question, settings=SETTINGS)
    assert result.source_lang == "en" and result.question_en == question
    assert result.question_ja == qa.en_ja.translate([question])[0]


def test_answer_is_what_the_answer_stage_gives(qa):
    question = "What is inflation?"
    result = qa.ask(question, settings=SETTINGS)
    assert result.answer_en == qa.answerer.answer([question], SETTINGS)[0].text


def test_json_has_the_contract_fields(qa):
    data = json.loads(qa.ask("What is a bond?", settings=SETTINGS).render("json"))
    for key in ("source_lang", "question_en", "question_ja", "answer_en", "answer_ja", "finish_reason",
                "models", "timings"):
        assert key in data
    assert set(data["models"]) == {"llm", "ja_en", "en_ja"}
    assert set(data["timings"]) >= {"detect", "translate_question", "answer", "translate_answer", "total"}
    assert data["finish_reason"] in ("eos", "stop", "length")


def test_text_format_is_the_articles_layout(qa):
    result = qa.ask("What is a bond?", settings=SETTINGS)
    text = result.render("text")
    english, japanese = text.split("\n### ---\n")
    assert result.answer_en in english and result.answer_ja in japanese
    assert result.question_ja in japanese


def test_markdown_format_has_both_sections(qa):
    text = qa.ask("What is a bond?", settings=SETTINGS).render("markdown")
    assert "## English" in text and "## 日本語" in text


def test_batch_answers_match_single_answers_and_bad_rows_stay_in_place(qa):
    questions = ["What is a bond?", "", "利率上升会如何影响个人和企业的经济活动？", JA_QUESTION]
    results = qa.ask_batch(questions, settings=SETTINGS)
    assert isinstance(results[1], EmptyInputError)
    assert isinstance(results[2], UnsupportedLanguageError)
    for index in (0, 3):
        single = qa.ask(questions[index], settings=SETTINGS)
        assert results[index].answer_en == single.answer_en
        assert results[index].answer_ja == single.answer_ja


def test_forced_source_language_skips_detection(qa):
    result = qa.ask("円安", source_lang="en", settings=SETTINGS)
    assert result.source_lang == "en" and result.question_en == "円安"


def test_empty_question_raises(qa):
    with pytest.raises(EmptyInputError):
        qa.ask("   ", settings=SETTINGS)


def test_compare_runs_each_model_and_keeps_the_translators(qa, tiny_phi2_dir, tmp_path):
    from pipeline.checkpoints import build_tiny_phi2

    other = build_tiny_phi2(tmp_path / "fine-tune", layers=1)
    compared = BilingualQA(qa.answerer, qa.ja_en, qa.en_ja)
    ja_en = compared.ja_en
    results = compared.compare("What is a bond?", [str(tiny_phi2_dir), str(other)], settings=SETTINGS,
                               engine="transformers")
    assert [r.models["llm"] for r in results] == [str(tiny_phi2_dir), str(other)]
    assert results[0].question_ja == results[1].question_ja
    assert compared.ja_en is ja_en


@pytest.mark.parametrize("question", ["What is a bond?", JA_QUESTION])
def test_streamed_layout_equals_the_rendered_answer(qa, question):
    streamed = "".join(qa.stream_text(question, settings=SETTINGS))
    assert streamed == qa.ask(question, settings=SETTINGS).render("text")


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"temperature": -0.5}, {"top_p": 0.0},
                                 {"top_p": float("inf")}, {"seed": -1}, {"seed": 2**32}, {"max_new_tokens": 0}])
def test_generation_settings_out_of_range_are_refused_with_the_setting_named(bad):
    from pipeline import BilingualQAError

    [name] = bad
    with pytest.raises(BilingualQAError, match=name) as refused:
        GenerationSettings(**bad)
    assert "\n" not in str(refused.value) and isinstance(refused.value, ValueError)


@pytest.mark.parametrize("tiny", [1e-300, 5e-324, 1e-3])
def test_a_tiny_positive_temperature_is_raised_to_the_floor_and_samples(qa, tiny):
    from pipeline.spec import MIN_TEMPERATURE

    settings = GenerationSettings(max_new_tokens=8, temperature=tiny, seed=3)
    assert settings.temperature == MIN_TEMPERATURE and not settings.greedy
    result = qa.ask("What is a bond?", settings=settings)  # divided by 1e-300 the logits were inf: NaN
    assert result.generated_tokens > 0


def test_version_has_one_definition_that_the_package_metadata_reads():
    """pyproject.toml takes the version from pipeline/__init__.py (no second spelling of it)."""
    import importlib.metadata
    from pathlib import Path

    import pipeline

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text("utf-8"))
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}
    assert pipeline.__version__ == importlib.metadata.version("bilingual-qa")
