"""Input that used to give a 500, and the limits a deployment sets: each a 400 (or 413/415) whose
message names the API's field, never a CLI flag, from a real uvicorn server on loopback."""

from __future__ import annotations

import json

import httpx
import pytest

from serve_support import AUTH, TOKENS, start_server

JSON = {**AUTH, "Content-Type": "application/json"}
DEEP = 100_000


@pytest.fixture(scope="module")
def small_limits_server(registry):
    from pipeline.serve.app import ServerConfig, create_app

    server, thread, url = start_server(create_app(registry, ServerConfig(api_key="test-key", char_limit=50,
                                                                         batch_limit=2)))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def post(url: str, path: str, body: bytes, headers: dict = JSON) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60)


# Raw bodies, as a hostile client writes them (json.dumps would refuse some of them).
CASES = [
    ("/v1/ask", b'{"question": "\\ud800"}', "surrogate"),
    ("/v1/ask", b'{"question": "What is a bond?", "model": "\\udc00x"}', "surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ("/translate", b'{"q": "\\ud83d", "target": "ja"}', "surrogate"),
    ("/v1/ask", b'{"question": "What is a bond?", "max_new_tokens": Infinity}', "JSON"),
    ("/v1/ask", b'{"question": "What is a bond?", "temperature": NaN}', "JSON"),
    ("/v1/ask", b'{"question": "What is a bond?", "temperature": 1e400}', "JSON"),
    ("/v1/ask", b'{"question": "What is a bond?", "max_new_tokens": ' + b"9" * 5000 + b"}", "JSON"),
    ("/v1/ask", b'{"question": "What is a bond?", "seed": ' + b"9" * 30 + b"}", "seed"),
    ("/v1/ask", b'{"question": "What is a bond?", "seed": "' + b"9" * 5000 + b'"}', "seed"),
    ("/v1/ask", b'{"question": ' + b"[" * DEEP + b"]" * DEEP + b"}", "JSON"),
    ("/v1/ask", b'{"question": "What?", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested"),
    ("/v1/ask", b'{"question": ["What is a bond?"]}', "question"),
    ("/v1/ask", b'{"question": "What is a bond?", "source_lang": ["en"]}', "source_lang"),
    ("/translate", b'{"q": "hello", "target": ["ja"]}', "target"),
    ("/translate", b'{"q": "hello", "source": ["en"], "target": "ja"}', "source"),
    ("/translate", b'{"q": "hello", "target": "ja", "format": ["text"]}', "format"),
    ("/translate", b'{"q": "hello", "target": {"ja": 1}}', "target"),
    ("/detect", b'{"q": ["hello"]}', "q"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}', "text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1e400}', "JSON"),
    ("/v1/ask", b"\xff\xfe\x00bad", "JSON"),
]


@pytest.mark.parametrize("path, body, says", CASES, ids=[f"{path}-{index}" for index, (path, _, _) in enumerate(CASES)])
def test_malformed_json_is_a_400_naming_the_problem(live_server, path, body, says):
    response = post(live_server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error and "\n" not in error and len(error) < 300


@pytest.mark.parametrize("form, says", [
    ("q=hello&target=ja&target=en", "target"),
    ("q=hello&source=en&source=ja&target=ja", "source"),
    ("q=hello&target=ja&format=text&format=html", "format"),
])
def test_form_with_a_field_twice_is_a_400(live_server, form, says):
    headers = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    response = post(live_server, "/translate", form.encode(), headers)
    assert response.status_code == 400 and says in response.json()["error"]


def test_invalid_utf8_in_a_form_is_the_same_400_escaped_or_raw(live_server):
    headers = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    escaped = post(live_server, "/translate", b"q=%ff%fe&target=ja", headers)  # was U+FFFD, then "looks like"
    raw = post(live_server, "/translate", b"q=\xff\xfe&target=ja", headers)
    assert escaped.status_code == raw.status_code == 400
    assert escaped.json()["error"] == raw.json()["error"] and "UTF-8" in raw.json()["error"]


def test_http_errors_speak_the_apis_words_not_cli_flags(live_server, registry):
    chinese = "这个问题是关于经济的吗？我们应该怎么办"
    too_long = "What is a bond? " * 600  # over the pipeline's 4000 characters
    answers = [
        post(live_server, "/v1/ask", json.dumps({"question": chinese}).encode()),
        post(live_server, "/translate", json.dumps({"q": chinese, "target": "ja"}).encode()),
        post(live_server, "/v1/ask", json.dumps({"question": "What is a bond? " * 200, "max_new_tokens": 2000}).encode()),
        post(live_server, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Why is that so? " * 100}],
                                                              "max_tokens": 2000}).encode()),
        post(live_server, "/v1/ask", json.dumps({"question": too_long}).encode()),
    ]
    errors = [response.json()["error"] for response in answers]
    assert all(response.status_code == 400 for response in answers), errors
    assert '"source_lang"' in errors[0] and '"source"' in errors[1]
    assert "(max_new_tokens)" in errors[2] and "(max_tokens)" in errors[3]
    for error in errors:
        assert "--" not in error, error
        assert "/" not in error.replace("/v1", ""), error  # no path of this machine


def test_char_limit_and_batch_limit_are_400s_that_name_them(small_limits_server):
    url = small_limits_server
    many = post(url, "/translate", json.dumps({"q": ["a.", "b.", "c."], "target": "ja"}).encode())
    long_q = post(url, "/translate", json.dumps({"q": "hello " * 20, "target": "ja"}).encode())
    long_ask = post(url, "/v1/ask", json.dumps({"question": "What is a bond? " * 5}).encode())
    long_chat = post(url, "/v1/chat/completions",
                     json.dumps({"messages": [{"role": "user", "content": "Why? " * 20}]}).encode())
    fits = post(url, "/translate", json.dumps({"q": ["a.", "b."], "target": "ja"}).encode())
    assert many.status_code == 400 and "batch_limit is 2" in many.json()["error"]
    for response in (long_q, long_ask, long_chat):
        assert response.status_code == 400 and "char_limit is 50" in response.json()["error"]
    assert fits.status_code == 200


def test_json_is_read_only_from_application_json(live_server):
    body = json.dumps({"question": "What is a bond?", "max_new_tokens": TOKENS}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        response = post(live_server, "/v1/ask", body, headers)
        assert response.status_code == 415 and "application/json" in response.json()["error"]
    chat = post(live_server, "/v1/chat/completions", b'{"messages": []}', {**AUTH, "Content-Type": "text/plain"})
    assert chat.status_code == 415
    form = post(live_server, "/detect", b"q=hello+there", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200  # the LibreTranslate endpoints keep their form bodies
    plain = post(live_server, "/translate", b'{"q": "hi", "target": "ja"}', {**AUTH, "Content-Type": "text/plain"})
    assert plain.status_code == 415


def test_a_blank_or_near_miss_key_is_refused(live_server):
    body = json.dumps({"q": "hello there"}).encode()
    for header in ("Bearer", "Bearer test-ke", "Bearer test-key-", "Bearer TEST-KEY", "Basic test-key"):
        response = post(live_server, "/detect", body, {"Authorization": header, "Content-Type": "application/json"})
        assert response.status_code == 401, header
    blank_field = post(live_server, "/detect", json.dumps({"q": "hello", "api_key": "  "}).encode(),
                       {"Content-Type": "application/json"})
    assert blank_field.status_code == 401
    assert post(live_server, "/detect", body).status_code == 200


def test_blank_key_in_the_config_is_no_key():
    from pipeline.serve.http import ServerConfig

    assert ServerConfig(api_key="   ").api_key is None and ServerConfig(api_key="").api_key is None
    assert ServerConfig(api_key=" k ").api_key == "k"
