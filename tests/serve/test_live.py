"""A real uvicorn server on loopback: many callers at once, a bounded load test, the clients people
use (openai SDK, libretranslatepy), graceful SIGTERM, and the page in headless Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipeline.serve.ready import wait_until_ready
from serve_support import AUTH, KEY, QUESTIONS, TOKENS, comparable, free_port

ROOT = Path(__file__).resolve().parents[2]


def ask(url: str, question: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/ask", json={"question": question, "max_new_tokens": TOKENS, **extra},
                      headers=AUTH, timeout=120)


def test_concurrent_callers_each_get_their_own_answer_equal_to_asking_alone(live_server, alone):
    order = QUESTIONS * 2
    with ThreadPoolExecutor(len(order)) as pool:
        responses = list(pool.map(lambda q: ask(live_server, q), order))
    for question, response in zip(order, responses):
        assert response.status_code == 200
        assert comparable(response.json()) == alone[question]


def test_load_with_bad_requests_mixed_in_has_no_5xx_and_no_lost_or_crossed_answers(live_server, alone):
    bad = [
        lambda: httpx.post(f"{live_server}/v1/ask", content=b"{oops", timeout=60,
                           headers={**AUTH, "Content-Type": "application/json"}),
        lambda: httpx.post(f"{live_server}/v1/ask", json={"question": ""}, headers=AUTH, timeout=60),
        lambda: httpx.post(f"{live_server}/v1/ask", json={"question": "What?"}, timeout=60),
        lambda: httpx.post(f"{live_server}/translate", json={"q": "hi", "target": "xx"}, headers=AUTH, timeout=60),
    ]
    work = []
    for index in range(32):  # bounded: 32 requests, 8 at a time, each with a timeout
        if index % 4 == 3:
            work.append(("bad", bad[(index // 4) % len(bad)]))
        else:
            question = QUESTIONS[index % len(QUESTIONS)]
            work.append((question, lambda q=question: ask(live_server, q)))
    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda item: (item[0], item[1]()), work))
    assert time.monotonic() - began < 300
    assert len(results) == len(work)
    for kind, response in results:
        assert response.status_code < 500
        if kind == "bad":
            assert response.status_code in (400, 401)
        else:
            assert response.status_code == 200 and comparable(response.json()) == alone[kind]


def test_disconnected_stream_frees_its_row(live_server, registry):
    with httpx.stream("POST", f"{live_server}/v1/ask", headers=AUTH, timeout=60,
                      json={"question": "What is a bond?", "max_new_tokens": 1500, "stream": True}) as response:
        next(response.iter_lines())  # the first event: admitted and decoding
    scheduler = next(iter(registry.schedulers.values()))
    deadline = time.monotonic() + 30
    while scheduler.running_rows and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scheduler.running_rows == 0


def test_a_non_streaming_caller_that_leaves_frees_its_row_at_the_next_step(live_server, registry):
    scheduler = next(iter(registry.schedulers.values()))
    produced, count = [], scheduler.on_tokens
    scheduler.on_tokens = lambda n: (produced.append(n), count(n))
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
            httpx.post(f"{live_server}/v1/ask", headers=AUTH, timeout=0.5,
                       json={"question": "What is a bond?", "max_new_tokens": 2000, "raw": True})
        assert scheduler.running_rows == 1  # still decoding when the caller left
        deadline = time.monotonic() + 10
        while scheduler.running_rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.running_rows == 0
        assert sum(produced) < 1500  # freed, not run to its end (2,000 tokens take ~2 s here) for nobody
    finally:
        scheduler.on_tokens = count


def test_official_openai_sdk_talks_to_the_server(live_server, alone, registry):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key=KEY)
    assert [model.id for model in client.models.list()] == registry.names
    question = QUESTIONS[1]
    completion = client.chat.completions.create(model=registry.names[0], max_tokens=TOKENS,
                                                messages=[{"role": "user", "content": question}])
    assert completion.choices[0].message.content == alone[question]["answer_en"]
    streamed = client.chat.completions.create(model=registry.names[0], max_tokens=TOKENS, stream=True,
                                              messages=[{"role": "user", "content": QUESTIONS[0]}])
    content = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert "".join(content.split()) == "".join(alone[QUESTIONS[0]]["answer_ja"].split())
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server}/v1", api_key="wrong").models.list()


def test_libretranslate_client_bindings_work(live_server, qa):
    libretranslatepy = pytest.importorskip("libretranslatepy")
    api = libretranslatepy.LibreTranslateAPI(live_server, api_key=KEY)
    assert api.translate("金利とは何ですか？", "ja", "en") == qa.ja_en.translate(["金利とは何ですか？"])[0]
    assert api.translate("Hello world.", "auto", "ja") == qa.en_ja.translate(["Hello world."])[0]
    assert api.detect("これは日本語です")[0]["language"] == "ja"
    assert {item["code"] for item in api.languages()} == {"ja", "en"}


def test_sigterm_lets_the_request_in_flight_finish_then_exits(model_args):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--device", "cpu",
                               "--engine", "transformers", "--mt-backend", "transformers", *model_args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process=server)
        events = []
        with httpx.stream("POST", f"{url}/v1/ask", timeout=120,
                          json={"question": "What is a bond?", "max_new_tokens": 120, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if len(events) == 2:
                        server.send_signal(signal.SIGTERM)  # mid-answer
        assert events[-1] == "result"
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_refuses_a_public_host_without_a_key():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--host", "0.0.0.0"], capture_output=True,
                          text=True, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "BILINGUAL_QA_API_KEY"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "API key" in proc.stderr


def test_serve_without_the_extra_says_so_in_one_line(monkeypatch):
    from click.testing import CliRunner

    import pipeline.serve
    from pipeline.cli import main

    monkeypatch.setitem(pipeline.serve.REQUIRED_MODULES, "no_such_module_for_serve", "no-such-package")
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "pip install 'bilingual-qa[serve]'" in result.output

