"""`serve` with a base and two LoRA adapters of it: one copy of the base weights, one running batch
holding rows of all three, and each model's answer equal to `ask --llm MODEL` alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline import BilingualQA

from serve_support import AUTH, QUESTIONS, SETTINGS, comparable


@pytest.fixture(scope="module")
def family_dirs(tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir):
    return [str(tiny_phi2_dir), str(tiny_lora_dir), str(tiny_lora_second_dir)]


def served(directory: str) -> str:
    """The name the server gives a model directory (its name: no path reaches a client)."""
    return directory.rstrip("/").rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def family(family_dirs, tiny_ja_en_dir, tiny_en_ja_dir):
    from pipeline.serve.models import LoadOptions, ModelRegistry

    registry = ModelRegistry.load(LoadOptions(llms=family_dirs, ja_en=str(tiny_ja_en_dir), en_ja=str(tiny_en_ja_dir),
                                              device="cpu", engine="transformers", max_rows=16))
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def asked_alone(family_dirs, tiny_ja_en_dir, tiny_en_ja_dir):
    """What `ask --llm MODEL --format json` gives for each model and question (adapters merged)."""
    results = {}
    for name in family_dirs:
        qa = BilingualQA.from_pretrained(name, str(tiny_ja_en_dir), str(tiny_en_ja_dir), device="cpu",
                                         engine="transformers")
        for q in QUESTIONS:
            fresh_memory(qa.ja_en, qa.en_ja)
            results[(name, q)] = comparable(qa.ask(q, settings=SETTINGS).to_dict())
    return results


def fresh_memory(*translators) -> None:
    """An empty translation memory: a sentence's translation then depends on its own text alone, not on
    which sentences earlier callers had translated (the tiny random Marian's near-ties fall otherwise
    in another batch)."""
    for translator in translators:
        translator.use_memory(None)


def without_japanese(result: dict) -> dict:
    """The result less what the en->ja translator wrote (answer_ja; question_ja of an English question)."""
    return {key: value for key, value in comparable(result).items() if key not in ("answer_ja", "question_ja")}


def hold_first_step(scheduler, expected_jobs: int) -> list[set[int]]:
    """Make the scheduler's first decode step wait until `expected_jobs` were submitted (so they all
    join one batch), and record the adapters of the rows of every step."""
    submitted, seen, arrived = [], [], threading.Event()
    submit, step = scheduler.submit, scheduler.decode_batch.step

    def counting_submit(job):
        submitted.append(job)
        submit(job)
        if len(submitted) >= expected_jobs:
            arrived.set()

    def recording_step():
        arrived.wait(30)
        seen.append({row.adapter for row in scheduler.decode_batch.rows})
        return step()

    scheduler.submit, scheduler.decode_batch.step = counting_submit, recording_step
    return seen


def test_base_and_two_adapters_answer_as_each_alone_from_one_batch(family, family_dirs, asked_alone):
    from pipeline.serve.service import AskRequest, Service

    schedulers = {id(s) for s in family.schedulers.values()}
    assert len(schedulers) == 1 and family.schedulers[served(family_dirs[0])].mode == "continuous"
    requests = [(name, q) for q in QUESTIONS for name in family_dirs]
    service = Service(family)
    for name, q in requests:  # one at a time: the whole object of `ask --format json`
        fresh_memory(family.ja_en.translator, family.en_ja.translator)
        assert comparable(asyncio.run(service.ask(AskRequest(q, model=served(name), settings=SETTINGS)))) == asked_alone[(name, q)]
    seen = hold_first_step(family.schedulers[served(family_dirs[0])], len(requests))

    async def ask_all():
        return await asyncio.gather(*(service.ask(AskRequest(q, model=served(name), settings=SETTINGS))
                                      for name, q in requests))

    results = asyncio.run(ask_all())
    for (name, q), result in zip(requests, results):
        # Everything the answer stage decides is equal. The Japanese is left out: the en->ja batcher
        # translates every caller's sentences together, and the tiny random Marian's near-ties may fall
        # otherwise in a batch than alone (the translation memory keeps whichever came first).
        assert without_japanese(result) == without_japanese(asked_alone[(name, q)]), (name, q)
    assert max(len(adapters) for adapters in seen) == 3  # rows of the base and both adapters in one step
    answers = {name: [asked_alone[(name, q)]["answer_en"] for q in QUESTIONS] for name in family_dirs}
    assert len({tuple(a) for a in answers.values()}) == 3  # three models that answer differently
    # the adapter's result names its base as the server serves it
    assert results[requests.index((family_dirs[1], QUESTIONS[0]))]["models"]["llm_base"] == served(family_dirs[0])


def test_the_base_weights_are_held_once(family, family_dirs, tiny_phi2_dir):
    from transformers import PhiForCausalLM

    models = {id(qa.answerer.model) for qa in family.qas.values()}
    assert len(models) == 1
    base_bytes = sum(p.nbytes for p in PhiForCausalLM.from_pretrained(tiny_phi2_dir).parameters())
    held = {}
    for qa in family.qas.values():
        for parameter in qa.answerer.engine.model.parameters():
            held[parameter.data_ptr()] = parameter.nbytes
    # The base once plus the two adapters' factors; three separate (merged) copies would be 3x.
    assert base_bytes <= sum(held.values()) < 1.5 * base_bytes


def test_models_and_chat_list_and_take_the_adapters_by_name(family, family_dirs):
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app

    with TestClient(create_app(family, ServerConfig()), base_url="http://127.0.0.1") as client:  # keyless: loopback
        entries = client.get("/v1/models", headers=AUTH).json()["data"]
        listed = [m["id"] for m in entries]
        assert listed == family.names == [served(d) for d in family_dirs]
        # each adapter's entry names its base (what the page opens its comparison on); the base names none
        assert [m.get("base") for m in entries] == [None, served(family_dirs[0]), served(family_dirs[0])]
        short = served(family_dirs[2])
        chat = client.post("/v1/chat/completions", json={"model": short, "max_tokens": SETTINGS.max_new_tokens,
                                                         "messages": [{"role": "user", "content": QUESTIONS[1]}]})
        asked = client.post("/v1/ask", json={"model": short, "question": QUESTIONS[1],
                                             "max_new_tokens": SETTINGS.max_new_tokens})
    assert chat.status_code == 200 and asked.status_code == 200
    assert chat.json()["bilingual_qa"]["models"] == {"llm": short, "llm_base": served(family_dirs[0]),
                                                     "ja_en": "opus-mt-ja-en", "en_ja": "fugumt-en-ja"}
    assert chat.json()["choices"][0]["message"]["content"] == asked.json()["answer_en"]


def test_micro_batching_puts_the_three_models_rows_into_one_generate_call(
        family_dirs, tiny_ja_en_dir, tiny_en_ja_dir, asked_alone):
    from pipeline.serve.models import LoadOptions, ModelRegistry
    from pipeline.serve.service import AskRequest, Service

    registry = ModelRegistry.load(LoadOptions(llms=family_dirs, ja_en=str(tiny_ja_en_dir), en_ja=str(tiny_en_ja_dir),
                                              device="cpu", engine="transformers", batching="micro"))
    scheduler = registry.schedulers[served(family_dirs[0])]
    assert scheduler.mode == "micro-batch"
    requests = [(name, q) for q in QUESTIONS[1:3] for name in family_dirs]  # English: no translation wait
    calls, arrived, submitted = [], threading.Event(), []
    generate, submit = scheduler.engine.generate, scheduler.submit

    def counting_submit(job):
        submitted.append(job)
        submit(job)
        if len(submitted) >= len(requests):
            arrived.set()

    def recording_generate(prompts, settings, stop_check=None, adapters=None):
        arrived.wait(30)  # the first call holds the rest back: they all wait for the next one
        calls.append(adapters or [0] * len(prompts))
        return generate(prompts, settings, stop_check, adapters)

    scheduler.submit, scheduler.engine.generate = counting_submit, recording_generate
    service = Service(registry)

    async def ask_all():
        return await asyncio.gather(*(service.ask(AskRequest(q, model=served(name), settings=SETTINGS))
                                      for name, q in requests))
    try:
        results = asyncio.run(ask_all())
    finally:
        registry.close()
    for (name, q), result in zip(requests, results):
        assert without_japanese(result) == without_japanese(asked_alone[(name, q)]), (name, q)
    assert max(len(set(adapters)) for adapters in calls) == 3
