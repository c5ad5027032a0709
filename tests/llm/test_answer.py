import pytest
import torch

from pipeline.llm.answerer import PROMPT, Answerer
from pipeline.errors import InputTooLongError
from pipeline.llm.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenerationSettings, TransformersEngine, finish_row


@pytest.fixture(scope="module")
def answerer(tiny_phi2_dir):
    return Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")


def test_prompt_uses_the_model_cards_qa_format(answerer):
    ids = answerer.encode("What is inflation?", 16)
    assert answerer.tokenizer.decode(ids) == "Instruct: What is inflation?\nOutput:"
    assert PROMPT.format(question="Q") == "Instruct: Q\nOutput:"


def test_greedy_answer_matches_plain_generate(answerer):
    settings = GenerationSettings(max_new_tokens=12)
    prompt = answerer.encode("What is inflation?", 12)
    expected = answerer.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                       pad_token_id=answerer.tokenizer.eos_token_id)[0, len(prompt):]
    got = answerer.engine.generate([prompt], settings)[0]
    assert got.token_ids == [t for t in expected.tolist() if t != answerer.tokenizer.eos_token_id]


def test_each_row_of_a_batch_matches_the_row_alone(answerer):
    settings = GenerationSettings(max_new_tokens=10)
    prompts = [answerer.encode(q, 10) for q in ["What is a bond?", "Why do central banks raise rates so often?"]]
    together = answerer.engine.generate(prompts, settings)
    alone = [answerer.engine.generate([p], settings)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_sampling_with_a_seed_is_reproducible(answerer):
    settings = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    first = answerer.answer(["What is a loan?"], settings)[0].text
    second = answerer.answer(["What is a loan?"], settings)[0].text
    other = answerer.answer(["What is a loan?"], GenerationSettings(max_new_tokens=16, temperature=0.9, seed=8))[0].text
    assert first == second
    assert first != other


def test_stop_check_ends_generation_early_with_finish_reason_stop(answerer):
    prompt = answerer.encode("What is a loan?", 30)
    stop_after_four = lambda row, ids: len(ids) >= 4  # noqa: E731
    row = answerer.engine.generate([prompt], GenerationSettings(max_new_tokens=30), stop_after_four)[0]
    assert row.finish_reason == FINISH_STOP
    assert 4 <= len(row.token_ids) < 30


def test_length_limit_gives_finish_reason_length(answerer):
    prompt = answerer.encode("What is a loan?", 5)
    row = answerer.engine.generate([prompt], GenerationSettings(max_new_tokens=5))[0]
    assert (row.finish_reason, len(row.token_ids)) == (FINISH_LENGTH, 5)


def test_finish_row_names_eos_stop_and_length():
    never = lambda row, ids: False  # noqa: E731
    assert finish_row([5, 6, 0, 0], 0, 10, never).finish_reason == FINISH_EOS
    assert finish_row([5, 6, 0, 0], 0, 10, never).token_ids == [5, 6]
    assert finish_row([5, 6, 7], 0, 3, never).finish_reason == FINISH_LENGTH
    # a row stopped by a stop sequence is padded with end-of-text afterwards: still "stop"
    assert finish_row([5, 6, 0, 0], 0, 10, lambda row, ids: 6 in ids).finish_reason == FINISH_STOP


def test_question_too_long_for_phi2_is_refused_with_the_limit(answerer):
    with pytest.raises(InputTooLongError, match="2048"):
        answerer.encode("interest " * 2100, 256)


def test_streamed_text_equals_the_final_answer(answerer):
    settings = GenerationSettings(max_new_tokens=20)
    streamed = "".join(answerer.stream("What is a bond?", settings))
    assert streamed == answerer.answer(["What is a bond?"], settings)[0].text


def test_transformers_engine_stream_yields_same_tokens_as_generate(answerer):
    settings = GenerationSettings(max_new_tokens=8)
    prompt = answerer.encode("Why save?", 8)
    engine = TransformersEngine(answerer.model, answerer.tokenizer.eos_token_id)
    assert list(engine.stream(prompt, settings)) == engine.generate([prompt], settings)[0].token_ids
