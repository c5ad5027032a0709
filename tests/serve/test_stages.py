"""The stage threads survive every caller: one that leaves while its answer is translated, a document
of 100 KB beside a question, and, if a stage thread dies anyway, /health says so (real uvicorn)."""

from __future__ import annotations

import logging
import statistics
import threading
import time

import httpx
import pytest

from serve_support import AUTH, QUESTIONS, TOKENS, start_server


def ask(url: str, question: str, headers: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/ask", json={"question": question, "max_new_tokens": TOKENS, **extra},
                      headers=headers or {}, timeout=120)


def test_callers_gone_while_their_answers_are_translated_leave_the_stage_running(live_server, registry, monkeypatch):
    """The translate-ja wedge: a stream closed mid-translation, once while its pieces were being
    translated and once while they waited for the round before, used to kill the thread for good."""
    batcher = registry.en_ja
    real, entered = batcher.translator.translate_ids, threading.Event()

    def slow_first_round(ids, beams):
        if not entered.is_set():
            entered.set()
            time.sleep(5)
        return real(ids, beams)

    monkeypatch.setattr(batcher.translator, "translate_ids", slow_first_round)

    def body(number: int) -> dict:  # a question nobody asked: the translation memory cannot know it
        return {"question": f"What is bond number {number} of {time.time_ns()}?", "max_new_tokens": TOKENS,
                "stream": True}

    # Each stream's line iterator is held until its `with` ends: a dropped one closes the connection.
    with httpx.stream("POST", f"{live_server}/v1/ask", json=body(1), headers=AUTH, timeout=60) as running:
        lines = running.iter_lines()
        next(line for line in lines if line == "event: english")
        assert entered.wait(60)  # its pieces are being translated: leave now
    with httpx.stream("POST", f"{live_server}/v1/ask", json=body(2), headers=AUTH, timeout=60) as waiting:
        lines = waiting.iter_lines()
        next(line for line in lines if line == "event: english")
        deadline = time.monotonic() + 30
        while batcher.quick.qsize() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batcher.quick.qsize() > 0  # its pieces wait behind the slow round: leave now
    time.sleep(5.5)
    assert all(thread.is_alive() for thread in batcher.threads)
    after = ask(live_server, QUESTIONS[0], AUTH)
    assert after.status_code == 200 and after.json()["answer_ja"]
    translated = httpx.post(f"{live_server}/translate", json={"q": "Hello world.", "target": "ja"}, headers=AUTH,
                            timeout=60)
    assert translated.status_code == 200 and translated.json()["translatedText"]
    assert httpx.get(f"{live_server}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{live_server}/metrics", headers=AUTH, timeout=10).text
    assert "bilingual_qa_queue_depth 0.0" in metrics  # both streams released their admission


def test_a_stage_thread_that_dies_makes_health_503_and_the_log_says_why(qa, caplog):
    from pipeline.serve.app import create_app
    from pipeline.serve.models import ModelRegistry

    registry = ModelRegistry({"phi-2": qa}, max_rows=4)
    server, thread, url = start_server(create_app(registry))
    try:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        with caplog.at_level(logging.ERROR, logger="bilingual_qa.serve"):
            registry.ja_en.waiting.put(object())  # not a job: the thread fails on it, on purpose
            registry.ja_en.thread.join(timeout=30)
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and "translate-en" in health.json()["error"]
        assert "the translate-en thread stopped" in caplog.text and "AttributeError" in caplog.text
        began = time.monotonic()
        refused = ask(url, QUESTIONS[0])
        assert refused.status_code == 503 and "translate-en" in refused.json()["error"]
        assert time.monotonic() - began < 10  # refused at once, not left hanging
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        registry.close()


def test_an_answer_thread_that_meets_an_error_fails_the_rows_it_held_and_goes_on_serving(qa, caplog):
    from pipeline.serve.app import create_app
    from pipeline.serve.models import ModelRegistry

    registry = ModelRegistry({"phi-2": qa}, max_rows=4)
    scheduler = registry.schedulers["phi-2"]
    server, thread, url = start_server(create_app(registry))
    try:
        outcome = {}
        asking = threading.Thread(target=lambda: outcome.update(response=ask(url, QUESTIONS[1], max_new_tokens=1500)))
        asking.start()
        deadline = time.monotonic() + 60
        while scheduler.running_rows == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.running_rows == 1  # its row is decoding
        with caplog.at_level(logging.ERROR, logger="bilingual_qa.serve"):
            scheduler.waiting.put(object())  # not a job: the thread fails on it, on purpose
            asking.join(timeout=30)
        assert not asking.is_alive()  # the caller whose row was decoding is answered, not left hanging
        failed = outcome["response"]
        assert failed.status_code == 503, failed.text
        assert scheduler.thread.name in failed.json()["error"] and "try again" in failed.json()["error"]
        assert f"the {scheduler.thread.name} thread met an error" in caplog.text
        assert scheduler.thread.is_alive()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        answered = ask(url, QUESTIONS[0])
        assert answered.status_code == 200, answered.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        registry.close()


def document(size: int) -> str:
    """English text of `size` characters, every sentence different (the translation memory would
    otherwise translate each once)."""
    sentences = (f"In quarter {i} the bank raised its rate by {i % 7} points and prices moved {i * 3} percent."
                 for i in range(size))
    return " ".join(sentences)[:size]


def test_a_question_beside_a_100_kb_translation_is_answered_within_twice_its_time_alone(registry):
    from pipeline.serve.app import create_app

    server, thread, url = start_server(create_app(registry))
    try:
        ask(url, "What is a bond?")  # warm

        # The same questions alone and beside the document, each answer translated as when first asked
        # (an empty translation memory before each): the random tiny models' answers differ in length
        # from question to question, so only the same questions compare the two times.
        questions = [f"What is bond number {number}?" for number in range(7)]

        def latencies() -> list[float]:
            times = []
            for question in questions:
                for batcher in (registry.ja_en, registry.en_ja):
                    batcher.translator.use_memory(None)
                began = time.perf_counter()
                assert ask(url, question).status_code == 200
                times.append(time.perf_counter() - began)
            return times

        alone = latencies()
        outcome = {}
        big = threading.Thread(target=lambda: outcome.update(response=httpx.post(
            f"{url}/translate", json={"q": document(100_000), "target": "ja"}, timeout=600)))
        big.start()
        deadline = time.monotonic() + 60
        while registry.en_ja.waiting.qsize() == 0 and not registry.en_ja.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        beside = statistics.median(latencies())
        assert big.is_alive(), "the document was done before the questions: nothing was measured"
        big.join(timeout=600)
        response = outcome["response"]
        assert response.status_code == 200 and len(response.json()["translatedText"]) > 1000
        alone = statistics.median(alone + latencies())  # before and after: the shared CPU's load drifts
        print(f"question alone {alone:.3f} s, beside a 100 KB translation {beside:.3f} s (medians)")
        assert beside <= 2 * alone, f"median {beside:.3f} s beside the document, {alone:.3f} s alone"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
