import pytest
import torch

from pipeline.llm.answerer import Answerer
from pipeline.llm.prompt import PROMPT
from pipeline.errors import InputTooLongError
from pipeline.llm.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, TransformersEngine, finish_row
from pipeline.spec import GenerationSettings
from pipeline.text.answer_end import END_OF_TEXT, trim_answer

from answer_helpers import find_stop  # tests/answer_helpers.py


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


# ---- where the answer ends, through the Answerer ------------------------------------------------------

class ReplayEngine:
    """The engine contract over fixed token ids: rows "generate" the ids given, the stop check runs
    after every token as in TransformersEngine. It drives the real Answerer (prompt, tokenizer, stop
    check, trimming, streaming) through exact phi-2-style texts, which random tiny weights never write."""

    name = "replay"

    def __init__(self, rows: list[list[int]], eos_token_id: int):
        self.rows, self.eos_token_id = rows, eos_token_id

    def _run(self, row: int, settings, stop_check):
        ids = []
        for token in self.rows[row][:settings.max_new_tokens]:
            ids.append(token)
            yield token
            if stop_check is not None and stop_check(row, ids):
                return

    def generate(self, prompts, settings, stop_check=None):
        return [finish_row(list(self._run(row, settings, stop_check)) + [self.eos_token_id], self.eos_token_id,
                           settings.max_new_tokens, stop_check, row) for row in range(len(prompts))]

    def stream(self, prompt, settings, stop_check=None):
        yield from self._run(0, settings, stop_check)


def replaying(answerer, outputs: list[str]) -> tuple[Answerer, list[list[int]]]:
    rows = [answerer.tokenizer(text)["input_ids"] for text in outputs]
    assert [answerer.tokenizer.decode(r) for r in rows] == outputs  # byte-level BPE: the exact text
    engine = ReplayEngine(rows, answerer.tokenizer.eos_token_id)
    return Answerer(answerer.model, answerer.tokenizer, engine, answerer.name), rows


def test_answerer_stops_where_the_answer_ends_and_trims_as_trim_answer_does(answerer, answer_samples):
    settings = GenerationSettings(max_new_tokens=1500)
    outputs = [s.output.replace(END_OF_TEXT, "") for s in answer_samples]
    replay, rows = replaying(answerer, outputs)
    answers = replay.answer([s.question for s in answer_samples], settings)  # one batch, each row its question
    for sample, output, row, answer in zip(answer_samples, outputs, rows, answers):
        assert answer.text == trim_answer(output, sample.question)[0], sample.name
        stop = find_stop(output, sample.question)
        assert answer.finish_reason == (FINISH_STOP if stop is not None else FINISH_EOS), sample.name
        if stop is not None and "\n" in output[stop:].rstrip():  # stopped at the stop line, not at the end
            assert answer.generated_tokens < len(row), sample.name


def test_streamed_pieces_fed_token_by_token_join_to_the_answer(answerer, answer_samples):
    settings = GenerationSettings(max_new_tokens=1500)
    for sample in answer_samples:
        output = sample.output.replace(END_OF_TEXT, "")
        replay, _ = replaying(answerer, [output])
        pieces = list(replay.stream(sample.question, settings))
        assert "".join(pieces) == replay.answer([sample.question], settings)[0].text, sample.name


def test_raw_answer_is_the_whole_output_with_the_engines_finish_reason(answerer, answer_samples):
    raw = GenerationSettings(max_new_tokens=1500, raw=True)
    sample = next(s for s in answer_samples if s.name == "echo_then_answer_label_then_new_question")
    replay, rows = replaying(answerer, [sample.output])
    answer = replay.answer([sample.question], raw)[0]
    assert (answer.text, answer.finish_reason, answer.generated_tokens) == (sample.output.strip(), FINISH_EOS, len(rows[0]))
    assert "".join(replay.stream(sample.question, raw)) == sample.output.strip()


def test_raw_generation_runs_past_where_the_trimmed_answer_stops(answerer):
    # the tiny model writes noise; greedy, the trimmed answer is the trim of the raw one whatever it is
    question = "What is a bond?"
    trimmed = answerer.answer([question], GenerationSettings(max_new_tokens=40))[0]
    raw = answerer.answer([question], GenerationSettings(max_new_tokens=40, raw=True))[0]
    prompt = answerer.encode(question, 40)
    plain = answerer.model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                    pad_token_id=answerer.tokenizer.eos_token_id)[0, len(prompt):].tolist()
    plain = [t for t in plain if t != answerer.tokenizer.eos_token_id]
    assert raw.text == answerer.tokenizer.decode(plain, skip_special_tokens=True).strip()
    assert raw.generated_tokens == len(plain) >= trimmed.generated_tokens
    assert trimmed.text == trim_answer(raw.text, question)[0]
    assert "".join(answerer.stream(question, GenerationSettings(max_new_tokens=40, raw=True))) == raw.text
