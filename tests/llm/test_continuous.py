"""Continuous batching: rows that join a running batch, or leave it, decode what they decode alone."""

from pipeline.llm.continuous import open_decode_batch
from pipeline.spec import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=20)
QUESTIONS = ["What is interest?", "How do banks make money when rates rise and fall?", "Why?",
             "Explain compound interest to a child, please."]


def test_rows_joining_mid_batch_and_leaving_early_get_their_alone_answers(qa):
    answerer = qa.answerer
    prompts = [answerer.encode(q, SETTINGS.max_new_tokens) for q in QUESTIONS]
    alone = [answerer.engine.generate([p], SETTINGS)[0].token_ids for p in prompts]
    batch = open_decode_batch(answerer.engine, max_rows=4)
    got, rows = {}, {}

    def add(index):
        (key, first), = batch.add([(prompts[index], SETTINGS)])
        rows[key], got[index] = index, [first]

    add(0)
    add(1)
    for step in range(60):
        if step == 3:
            add(2)  # joins while rows 0 and 1 are mid-answer
        if step == 6:
            batch.drop(next(k for k, i in rows.items() if i == 1))  # leaves early: frees its row
            rows = {k: i for k, i in rows.items() if i != 1}
            add(3)
        for key, token in batch.step().items():
            index = rows[key]
            got[index].append(token)
            if len(got[index]) >= SETTINGS.max_new_tokens:
                batch.drop(key)
        if not len(batch):
            break
    eos = answerer.engine.eos_token_id
    for index in (0, 2, 3):
        ids = got[index][:got[index].index(eos)] if eos in got[index] else got[index]
        assert ids == alone[index]
    assert got[1] == alone[1][:len(got[1])]
    assert len(batch) == 0 and batch.cache is None


def test_an_engine_without_steps_gets_no_decode_batch():
    class WholeBatchesOnly:
        name = "fast"

    assert open_decode_batch(WholeBatchesOnly()) is None
