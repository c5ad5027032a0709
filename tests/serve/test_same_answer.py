"""The same question with the same options gets the same answer however it is asked (issue 31):
the Python API (`ask`, `ask_batch`, the streamed events), the command line (`ask`, `ask --stream`,
`ask --batch`, `compare`) and a server (`/v1/ask` whole and streamed, `/v1/chat/completions`, with
continuous and micro batching; `ask --server`, `ask --batch --server`), greedy and seeded sampling,
on the tiny checkpoints on the CPU: every route with the transformers engine, the Python API and a
server with the fast engine (graphs off).

Every route is held to `BilingualQA.ask`. A seeded sample drawn in a batch beside other questions
(`ask_batch`, `ask --batch`) differs today from the same question drawn alone: those cases are marked
xfail (not strict) until one sampler with a generator per row serves every decode path (the lead's,
in pipeline/llm/).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline import GenerationSettings
from pipeline.cli import main

from serve_support import AUTH, KEY, comparable, start_server  # tests/serve/serve_support.py
from test_remote_cli import remote  # tests/serve/test_remote_cli.py: a --server command in a real process

TOKENS = 16
GREEDY = GenerationSettings(max_new_tokens=TOKENS)
SEEDED = GenerationSettings(max_new_tokens=TOKENS, temperature=0.8, top_p=0.9, seed=7)
QUESTIONS = ["金利が上昇すると、経済にどのような影響がありますか？", "What is a bond?"]
def sampling(*seeded_marks):
    """Greedy and seeded; the seeded case carries `seeded_marks` (where sampling is drawn per path)."""
    return pytest.mark.parametrize("settings", [GREEDY, pytest.param(SEEDED, marks=list(seeded_marks), id="seeded")],
                                   ids=lambda settings: "greedy" if settings is GREEDY else "seeded")


def options(settings: GenerationSettings) -> list[str]:
    """The command line's spelling of `settings`."""
    given = ["--max-new-tokens", str(settings.max_new_tokens)]
    if not settings.greedy:
        given += ["--temperature", str(settings.temperature), "--top-p", str(settings.top_p), "--seed", str(settings.seed)]
    return given


def fields(question: str, settings: GenerationSettings) -> dict:
    """The API's spelling of `settings`."""
    return {"question": question, "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, **({"seed": settings.seed} if settings.seed is not None else {})}


@pytest.fixture(scope="module")
def local(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir) -> list[str]:
    """The options that load, in process, what the server serves (conftest's `qa`)."""
    return ["--llm", str(tiny_phi2_dir), "--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir),
            "--device", "cpu", "--engine", "transformers", "--mt-backend", "transformers", "--beams", "1"]


@pytest.fixture(scope="module")
def expected(qa):
    """Each settings' answer to each question through BilingualQA.ask: what every route must give."""
    return {(settings, question): comparable(qa.ask(question, settings=settings).to_dict())
            for settings in (GREEDY, SEEDED) for question in QUESTIONS}


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # the status lines go to stderr


# ---- the Python API ----------------------------------------------------------------------------------

@sampling()
def test_streamed_events_and_stream_text_give_what_ask_gives(qa, expected, settings):
    for question in QUESTIONS:
        events = list(qa.ask_events(question, settings=settings))
        english = "".join(data["text"] for kind, data in events if kind == "english")
        assert comparable(events[-1].data) == expected[settings, question]
        assert english == expected[settings, question]["answer_en"]
        shown = qa.ask(question, settings=settings).render("text")
        assert "".join(qa.stream_text(question, settings=settings)) == shown


@sampling()
def test_ask_batch_gives_what_ask_gives_beside_other_questions(qa, expected, settings):
    batch = [QUESTIONS[0], "How do banks make money?", QUESTIONS[1], "インフレとは何ですか？"]
    results = qa.ask_batch(batch, settings=settings)
    assert [comparable(results[i].to_dict()) for i in (0, 2)] == [expected[settings, q] for q in QUESTIONS]


# ---- the command line, in process --------------------------------------------------------------------

@sampling()
def test_ask_ask_stream_and_compare_print_what_ask_gives(local, qa, expected, settings, tiny_phi2_dir):
    compare_options = [option for option in local if option not in ("--llm", str(tiny_phi2_dir))]
    for question in QUESTIONS:
        printed = json.loads(cli("ask", question, "--format", "json", *options(settings), *local))
        assert comparable(printed) == expected[settings, question]
        streamed = cli("ask", question, "--stream", *options(settings), *local)
        assert streamed == qa.ask(question, settings=settings).render("text")
    compared = json.loads(cli("compare", QUESTIONS[0], "--llm", str(tiny_phi2_dir), "--format", "json",
                              *options(settings), *compare_options))
    assert [comparable(result) for result in compared] == [expected[settings, QUESTIONS[0]]]


@sampling()
def test_ask_batch_writes_what_ask_gives(local, expected, settings, tmp_path):
    questions = tmp_path / "questions.txt"
    questions.write_text(f"{QUESTIONS[0]}\nHow do banks make money?\n{QUESTIONS[1]}\n", encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    cli("ask", "--batch", str(questions), "--output", str(output), *options(settings), *local, "--quiet")
    rows = {row["question"]: row for row in map(json.loads, output.read_text("utf-8").splitlines())}
    for question in QUESTIONS:
        row = {key: value for key, value in rows[question].items() if key != "question"}
        assert comparable(row) == expected[settings, question]


# ---- a server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["continuous", "micro"])
def served(request, qa):
    """A server (in process) over the same models, with each way of batching answers."""
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app
    from pipeline.serve.models import ModelRegistry

    registry = ModelRegistry({qa.answerer.name: qa}, max_rows=16, batching=request.param)
    assert registry.schedulers[registry.default].mode == ("micro-batch" if request.param == "micro" else "continuous")
    try:
        with TestClient(create_app(registry, ServerConfig(api_key=KEY)), raise_server_exceptions=False) as client:
            yield client
    finally:
        registry.close()


def sse_events(body: str) -> list[tuple[str | None, object]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = block.split("\n")
        kind = lines[0][len("event: "):] if lines[0].startswith("event: ") else None
        data = lines[-1][len("data: "):]
        events.append((kind, data if data == "[DONE]" else json.loads(data)))
    return events


@sampling()
def test_v1_ask_whole_and_streamed_give_what_ask_gives(served, expected, settings):
    for question in QUESTIONS:
        whole = served.post("/v1/ask", json=fields(question, settings), headers=AUTH)
        assert whole.status_code == 200, whole.text
        assert comparable(whole.json()) == expected[settings, question]
        streamed = served.post("/v1/ask", json={**fields(question, settings), "stream": True}, headers=AUTH)
        events = sse_events(streamed.text)
        assert [kind for kind, _ in events][0] == "question" and events[-1][0] == "result"
        assert comparable(events[-1][1]) == expected[settings, question]
        assert "".join(data["text"] for kind, data in events if kind == "english") == \
            expected[settings, question]["answer_en"]


@sampling()
def test_chat_completions_give_what_ask_gives(served, expected, settings):
    for question in QUESTIONS:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p,
                **({"seed": settings.seed} if settings.seed is not None else {})}
        reply = served.post("/v1/chat/completions", json=body, headers=AUTH)
        assert reply.status_code == 200, reply.text
        result = reply.json()["bilingual_qa"]
        assert comparable(result) == expected[settings, question]
        language = "answer_ja" if expected[settings, question]["source_lang"] == "ja" else "answer_en"
        assert reply.json()["choices"][0]["message"]["content"] == result[language]


# ---- the command line through a server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server_url(qa):
    """A real server on loopback over the same models (continuous batching, as `serve` runs)."""
    from pipeline.serve.app import ServerConfig, create_app
    from pipeline.serve.models import ModelRegistry

    registry = ModelRegistry({qa.answerer.name: qa}, max_rows=16)
    server, thread, url = start_server(create_app(registry, ServerConfig(api_key=KEY)))
    yield url
    server.should_exit = True
    thread.join(timeout=30)
    registry.close()


@sampling()
def test_ask_and_ask_batch_through_a_server_give_what_ask_gives(server_url, expected, settings, tmp_path):
    for question in QUESTIONS:
        asked = remote("ask", question, "--format", "json", *options(settings), url=server_url)
        assert asked.returncode == 0, asked.stderr.decode()[-2000:]
        assert comparable(json.loads(asked.stdout)) == expected[settings, question]
    questions = tmp_path / "questions.txt"
    questions.write_text("".join(f"{question}\n" for question in QUESTIONS), encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    batch = remote("ask", "--batch", str(questions), "--output", str(output), *options(settings), "--quiet",
                   url=server_url)
    assert batch.returncode == 0, batch.stderr.decode()[-2000:]
    for row, question in zip(map(json.loads, output.read_text("utf-8").splitlines()), QUESTIONS):
        assert comparable({key: value for key, value in row.items() if key != "question"}) == \
            expected[settings, question]


# ---- the fast engine (graphs off, on the CPU) -----------------------------------------------------------

@pytest.fixture(scope="module")
def fast_qa(qa, tiny_phi2_dir):
    """The same pipeline with FastPhiEngine answering (its own copy of the weights: it stacks them)."""
    import torch
    from transformers import PhiForCausalLM

    from pipeline import BilingualQA
    from pipeline.llm.answerer import Answerer
    from pipeline.llm.fast_engine import FastPhiEngine

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    engine = FastPhiEngine(model, qa.answerer.engine.eos_token_id, use_graphs=False, use_triton=False,
                           max_seq_len=512)
    return BilingualQA(Answerer(model, qa.answerer.tokenizer, engine, qa.answerer.name), qa.ja_en, qa.en_ja,
                       spec=qa.spec)


@sampling()
def test_the_fast_engine_streams_what_it_answers_whole(fast_qa, settings):
    for question in QUESTIONS:
        whole = comparable(fast_qa.ask(question, settings=settings).to_dict())
        assert whole["engine"] == "fast"
        assert comparable(list(fast_qa.ask_events(question, settings=settings))[-1].data) == whole


@sampling()
def test_the_fast_engine_answers_in_a_batch_what_it_answers_alone(fast_qa, settings):
    results = fast_qa.ask_batch([QUESTIONS[0], "How do banks make money?", QUESTIONS[1]], settings=settings)
    assert [comparable(results[i].to_dict()) for i in (0, 2)] == \
        [comparable(fast_qa.ask(question, settings=settings).to_dict()) for question in QUESTIONS]


@pytest.mark.parametrize("batching", ["continuous", "micro"])
@sampling()
def test_a_server_on_the_fast_engine_gives_what_it_answers_in_process(fast_qa, settings, batching):
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app
    from pipeline.serve.models import ModelRegistry

    registry = ModelRegistry({fast_qa.answerer.name: fast_qa}, max_rows=8, batching=batching)
    try:
        with TestClient(create_app(registry, ServerConfig(api_key=KEY)), raise_server_exceptions=False) as client:
            for question in QUESTIONS:
                reply = client.post("/v1/ask", json=fields(question, settings), headers=AUTH)
                assert reply.status_code == 200, reply.text
                assert comparable(reply.json()) == comparable(fast_qa.ask(question, settings=settings).to_dict())
    finally:
        registry.close()
