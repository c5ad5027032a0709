"""The one composition (pipeline/flow.py) and its in-process drivers, on the tiny checkpoints: the
events and their order, each stage one batch in `ask_batch`, a refused stage call failing only the
question at fault, and an answer model still loading while the question is translated."""

from __future__ import annotations

import pytest

from pipeline import BilingualQA, GenerationSettings
from pipeline.errors import BilingualQAError, InputTooLongError
from pipeline.flow import LocalStages, Question, Translate, run_together

SETTINGS = GenerationSettings(max_new_tokens=16)
JA = "金利が上昇すると、経済にどのような影響がありますか？"
EN = "What is a bond?"


def kinds(events) -> list[str]:
    return [event.kind for event in events]


@pytest.mark.parametrize("question", [JA, EN])
def test_events_run_detect_question_english_answered_japanese_result_in_that_order(qa, question):
    events = list(qa.ask_events(question, settings=SETTINGS))
    order = kinds(events)
    assert order[:2] == ["detected", "question"] and order[-1] == "result"
    middle = order[2:-1]
    answered = middle.index("answered")
    assert set(middle[:answered]) <= {"english"} and set(middle[answered + 1:]) <= {"japanese"}
    result = events[-1].data
    assert "".join(event.data["text"] for event in events if event.kind == "english") == result["answer_en"]
    assert [event.data["index"] for event in events if event.kind == "japanese"] == \
        list(range(order.count("japanese")))
    assert events[1].data["model"] == result["models"]["llm"] == qa.models["llm"]


@pytest.mark.parametrize("question", [JA, EN])
def test_streamed_events_end_in_the_result_ask_gives(qa, question):
    streamed = list(qa.ask_events(question, settings=SETTINGS))[-1].data
    whole = qa.ask(question, settings=SETTINGS).to_dict()
    for result in (streamed, whole):
        result.pop("timings")
    assert streamed == whole


def test_a_problem_with_the_question_raises_before_the_first_event(qa):
    events = qa.ask_events("x" * 5000, settings=SETTINGS)
    with pytest.raises(InputTooLongError):
        next(events)


class CountingStages(LocalStages):
    """The real in-process stages, each call counted (and a text refused where asked)."""

    def __init__(self, qa, refuse: str | None = None):
        super().__init__(qa.ja_en, qa.en_ja, qa.answerer)
        self.calls: list[tuple[str, int]] = []
        self.refuse = refuse

    def translate_all(self, requests):
        self.calls.append((f"translate-{requests[0].target}", len(requests)))
        if any(self.refuse in request.texts for request in requests):
            raise BilingualQAError("this text is refused")
        return super().translate_all(requests)

    def generate(self, requests):
        self.calls.append(("generate", len(requests)))
        return super().generate(requests)


def test_a_batch_of_japanese_and_english_questions_is_one_call_per_stage(qa):
    questions = [EN, JA, "What is inflation?", "インフレとは何ですか？", ""]
    stages = CountingStages(qa)
    results: dict[int, dict] = {}
    errors = run_together([qa.flow(Question(q, settings=SETTINGS)) for q in questions], stages,
                          lambda index, event: event.kind == "result" and results.setdefault(index, event.data))
    assert [error is None for error in errors] == [True, True, True, True, False]
    assert stages.calls == [("translate-en", 2), ("generate", 4), ("translate-ja", 4)]
    for index, question in enumerate(questions[:4]):
        alone = qa.ask(question, settings=SETTINGS).to_dict()
        assert (results[index]["answer_en"], results[index]["answer_ja"]) == (alone["answer_en"], alone["answer_ja"])


def test_a_translation_refused_for_one_question_fails_only_that_question(qa):
    questions = [EN, JA, "What is inflation?"]
    stages = CountingStages(qa, refuse=JA)
    results: dict[int, dict] = {}
    errors = run_together([qa.flow(Question(q, settings=SETTINGS)) for q in questions], stages,
                          lambda index, event: event.kind == "result" and results.setdefault(index, event.data))
    assert str(errors[1]) == "this text is refused" and errors[0] is None and errors[2] is None
    assert sorted(results) == [0, 2]
    assert stages.calls == [("translate-en", 1), ("generate", 2), ("translate-ja", 2)]


def test_the_answer_model_is_taken_only_once_the_question_is_translated(qa):
    """A lean load hands BilingualQA a function that finishes loading phi-2: the question's
    detection and translation run before it is called, as they did before the composition."""
    order: list[str] = []

    def load_answerer():
        order.append("answerer")
        return qa.answerer

    pipeline = BilingualQA(load_answerer, qa.ja_en, qa.en_ja, spec=qa.spec)

    class Watching(LocalStages):
        def translate_all(self, requests: list[Translate]):
            order.append(f"translate-{requests[0].target}")
            return super().translate_all(requests)

    stages = Watching(pipeline.ja_en, pipeline.en_ja, lambda: pipeline.answerer)
    errors = run_together([pipeline.flow(Question(JA, settings=SETTINGS))], stages, lambda index, event: None)
    assert errors == [None]
    assert order == ["translate-en", "answerer", "translate-ja"]
