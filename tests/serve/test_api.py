"""Every endpoint, status code and the key, through Starlette's TestClient over the tiny models."""

from __future__ import annotations

import json
import threading

import pytest

from serve_support import AUTH, KEY, QUESTIONS, TOKENS, comparable


def ask(client, **body):
    return client.post("/v1/ask", json={"max_new_tokens": TOKENS, **body}, headers=AUTH)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        name = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        events.append((name, data))
    return events


def test_health_is_open_and_ok_once_loaded(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok", "max_batch": 16}  # conftest: max_rows=16


def test_health_is_503_with_retry_after_while_models_load(registry):
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return registry

    with TestClient(create_app(slow_load, ServerConfig()), base_url="http://localhost") as client:
        loading = client.get("/health")
        refused = client.post("/v1/ask", json={"question": "What is a bond?"})
        release.set()
    assert loading.status_code == 503 and "Retry-After" in loading.headers
    assert refused.status_code == 503 and refused.json()["error"]


@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_ask_returns_the_cli_json_object_equal_to_asking_alone(client, alone, question):
    response = ask(client, question=question)
    assert response.status_code == 200
    assert comparable(response.json()) == alone[question]
    assert set(response.json()["timings"]) == {"detect", "translate_question", "answer", "translate_answer", "total"}


def test_ask_streams_english_then_japanese_then_the_whole_result(client, alone):
    question = QUESTIONS[0]
    response = ask(client, question=question, stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    kinds = [name for name, _ in events]
    assert kinds[0] == "question" and kinds[-1] == "result"
    assert "english" in kinds and "japanese" in kinds
    assert max(i for i, k in enumerate(kinds) if k == "english") < min(i for i, k in enumerate(kinds) if k == "japanese")
    result = json.loads(events[-1][1])
    assert comparable(result) == alone[question]
    japanese = "".join(json.loads(data)["text"] for name, data in events if name == "japanese")
    assert "".join(japanese.split()) == "".join(result["answer_ja"].split())  # the layout's breaks aside


def test_model_field_selects_among_loaded_models(client, registry):
    names = registry.names
    answers = {name: ask(client, question="What is a bond?", model=name).json() for name in names}
    assert [answers[name]["models"]["llm"] for name in names] == names
    assert answers[names[0]]["answer_en"] != answers[names[1]]["answer_en"]
    short = names[1].rstrip("/").rsplit("/", 1)[-1]
    assert ask(client, question="What is a bond?", model=short).json()["models"]["llm"] == names[1]


@pytest.mark.parametrize("body, says", [
    ({"question": ""}, "empty"),
    ({"question": "   "}, "empty"),
    ({}, "question"),
    ({"question": 3}, "question"),
    ({"question": "这个问题是关于经济的吗？我们应该怎么办"}, "zh"),
    ({"question": "What is a bond?", "max_new_tokens": 0}, "max_new_tokens"),
    ({"question": "What is a bond?", "max_new_tokens": 5000}, "max_new_tokens"),
    ({"question": "What is a bond?", "top_p": 0}, "top_p"),
    ({"question": "What is a bond?", "temperature": -1}, "temperature"),
    ({"question": "What is a bond?", "beams": 99}, "beams"),
    ({"question": "What is a bond?", "source_lang": "fr"}, "source_lang"),
    ({"question": "What is a bond?", "model": "no-such-model"}, "unknown model"),
    ({"question": "What is a bond?", "stream": "maybe"}, "stream"),
])
def test_bad_ask_is_400_with_one_error_line(client, body, says):
    response = client.post("/v1/ask", json=body, headers=AUTH)
    assert response.status_code == 400
    assert says in response.json()["error"] and "\n" not in response.json()["error"]


def test_invalid_json_and_non_object_bodies_are_400(client):
    assert client.post("/v1/ask", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}).status_code == 400
    assert client.post("/v1/ask", json=["a list"], headers=AUTH).status_code == 400


@pytest.mark.parametrize("path, body", [
    ("/v1/ask", {"question": "What is a bond?"}),
    ("/translate", {"q": "hello", "target": "ja"}),
    ("/detect", {"q": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_missing_or_wrong_key_is_401(client, path, body):
    assert client.post(path, json=body).status_code == 401
    wrong = client.post(path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics").status_code == 401


def test_key_as_api_key_field_in_json_or_form(client):
    assert client.post("/detect", json={"q": "hello there", "api_key": KEY}).status_code == 200
    assert client.post("/detect", data={"q": "hello there", "api_key": KEY}).status_code == 200
    assert client.post("/detect", data={"q": "hello there", "api_key": "wrong"}).status_code == 401


def test_health_languages_and_page_are_open_without_the_key(client):
    assert client.get("/health").status_code == 200
    assert client.get("/languages").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "### ---" in page.text and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from the internet


def test_body_over_the_limit_is_413(client):
    response = client.post("/v1/ask", json={"question": "x" * 5000}, headers=AUTH)
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_full_queue_is_503_with_retry_after(registry):
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app

    app = create_app(registry, ServerConfig(max_queue=1))
    with TestClient(app, base_url="http://localhost") as client:
        app.state.serve.in_flight = 1  # one request admitted and not finished
        response = client.post("/v1/ask", json={"question": "What is a bond?"})
        app.state.serve.in_flight = 0
        after = client.post("/translate", json={"q": "hello", "target": "ja"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "queue is full" in response.json()["error"]
    assert after.status_code == 200


def test_internal_error_is_500_without_traceback(client, monkeypatch, caplog):
    from pipeline.serve.service import Service

    async def broken(self, request, gone=None):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Service, "ask", broken)
    with caplog.at_level("ERROR", logger="bilingual_qa.serve"):
        response = client.post("/v1/ask", json={"question": "What is a bond?"}, headers=AUTH)
    assert response.status_code == 500 and response.json() == {"error": "internal server error"}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internal detail" in caplog.text  # the server log has it


def test_translate_is_libretranslate_shaped(client, qa):
    one = client.post("/translate", json={"q": "金利とは何ですか？", "source": "auto", "target": "en"}, headers=AUTH)
    assert one.status_code == 200
    assert one.json()["translatedText"] == qa.ja_en.translate(["金利とは何ですか？"])[0]
    assert one.json()["detectedLanguage"]["language"] == "ja" and 0 < one.json()["detectedLanguage"]["confidence"] <= 100
    many = client.post("/translate", json={"q": ["Hello world.", "金利が上がります。"], "source": "auto", "target": "ja"},
                       headers=AUTH).json()
    assert many["translatedText"] == [qa.en_ja.translate(["Hello world."])[0], "金利が上がります。"]  # already Japanese: kept
    assert [d["language"] for d in many["detectedLanguage"]] == ["en", "ja"]
    form = client.post("/translate", data={"q": "Hello world.", "source": "en", "target": "ja", "api_key": KEY})
    assert form.json() == {"translatedText": many["translatedText"][0]}


@pytest.mark.parametrize("body", [{"target": "ja"}, {"q": "hi", "target": "fr"}, {"q": "hi", "source": "de", "target": "ja"},
                                  {"q": "hi", "target": "ja", "format": "pdf"}, {"q": [], "target": "ja"}])
def test_bad_translate_is_400(client, body):
    assert client.post("/translate", json=body, headers=AUTH).status_code == 400


def test_detect_and_languages(client):
    detected = client.post("/detect", json={"q": "これは日本語です"}, headers=AUTH).json()
    assert detected[0]["language"] == "ja" and 0 < detected[0]["confidence"] <= 100
    assert client.post("/detect", json={}, headers=AUTH).status_code == 400
    languages = client.get("/languages").json()
    assert {item["code"]: item["targets"] for item in languages} == {"en": ["ja"], "ja": ["en"]}


def test_chat_completions_reply_in_the_question_language(client, alone):
    question = QUESTIONS[0]
    response = client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}],
        "max_tokens": TOKENS})
    body = response.json()
    assert response.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": alone[question]["answer_ja"]}
    assert comparable(body["bilingual_qa"]) == alone[question]
    assert body["usage"]["completion_tokens"] == alone[question]["generated_tokens"]


def test_chat_completions_stream_is_openai_chunks_ending_in_done(client, alone):
    question = QUESTIONS[1]
    response = client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": question}], "max_tokens": TOKENS, "stream": True})
    events = sse_events(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert content.strip() and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert comparable(chunks[-1]["bilingual_qa"]) == alone[question]


def test_bad_chat_requests_are_400(client):
    for body in ({}, {"messages": []}, {"messages": [{"role": "system", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "hi"}], "n": 2}):
        assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 400


def test_models_lists_every_loaded_model(client, registry):
    body = client.get("/v1/models", headers=AUTH).json()
    assert [model["id"] for model in body["data"]] == registry.names


def test_metrics_count_requests_errors_and_tokens(client):
    ask(client, question="What is a bond?")
    client.post("/v1/ask", json={"question": ""}, headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert 'bilingual_qa_requests_total{code="200",endpoint="/v1/ask"}' in text
    assert 'bilingual_qa_errors_total{code="400",endpoint="/v1/ask"}' in text
    for name in ("bilingual_qa_queue_depth", "bilingual_qa_batch_rows", "bilingual_qa_generated_tokens_total",
                 "bilingual_qa_stage_seconds_bucket"):
        assert name in text
