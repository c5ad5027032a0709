"""Floods that used to hold everyone back (issue 33): translations sent and dropped, documents
without a sentence break, and /detect requests by the hundred. Each leaves a question within twice
its time alone, and abandoned work stops costing anything (real uvicorn, tiny models, bounded counts)."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from serve_support import TOKENS, start_server

QUESTIONS = [f"What is bond number {number}?" for number in range(7)]


@pytest.fixture()
def open_server(registry):
    """No key, a queue of 160: what a flood is measured against."""
    from pipeline.serve.app import ServerConfig, create_app

    server, thread, url = start_server(create_app(registry, ServerConfig(max_queue=160)))
    httpx.post(f"{url}/v1/ask", json={"question": "What is a bond?", "max_new_tokens": TOKENS}, timeout=120)  # warm
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def question_times(url: str, registry, during=None) -> list[float]:
    """Each question's time, its translations done anew (an empty memory before each); `during()`
    must hold after the median question (the flood still running)."""
    times = []
    for index, question in enumerate(QUESTIONS):
        if index == len(QUESTIONS) // 2 + 1 and during is not None:
            assert during(), "the flood was over before the median question: nothing was measured"
        for batcher in (registry.ja_en, registry.en_ja):
            batcher.translator.use_memory(None)
        began = time.perf_counter()
        response = httpx.post(f"{url}/v1/ask", json={"question": question, "max_new_tokens": TOKENS}, timeout=300)
        assert response.status_code == 200, response.text
        times.append(time.perf_counter() - began)
    return times


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """A whole POST sent on a socket of its own, its answer left unread."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def compared(url: str, registry, flood, flooding) -> tuple[float, float]:
    """Median question time alone (before and after) and while `flood()` runs (`flooding()` true)."""
    alone = question_times(url, registry)
    flood()
    beside = question_times(url, registry, during=flooding)
    return statistics.median(alone + question_times(url, registry)), statistics.median(beside)


def document(index: int, size: int) -> str:
    sentences = (f"Report {index} says the rate in quarter {i} rose by {i % 9} points." for i in range(size))
    return " ".join(sentences)[:size]


def test_translations_sent_and_dropped_stop_costing_and_leave_questions_on_time(open_server, registry):
    url, batcher = open_server, registry.en_ja
    rounds = []
    batcher.on_batch = rounds.append
    try:
        alone = question_times(url, registry)
        for batch in range(4):  # 64 documents of 20 KB, each caller gone 0.3 s after sending it
            socks = [raw_post(url, "/translate", {"q": document(100 * batch + i, 20_000), "target": "ja"})
                     for i in range(16)]
            time.sleep(0.3)
            for sock in socks:
                sock.close()
        deadline = time.monotonic() + 20
        while (batcher.busy or not batcher.waiting.empty()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not batcher.busy and batcher.waiting.empty(), "abandoned translations still run"
        pieces = sum(rounds)
        time.sleep(2)
        assert sum(rounds) == pieces  # nothing more is translated for them
        assert pieces < 64 * 360 / 10  # most of their ~360 sentences each were never translated
        beside = question_times(url, registry)
    finally:
        batcher.on_batch = lambda n: None
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "bilingual_qa_queue_depth 0.0" in metrics
    assert statistics.median(beside) <= 2 * statistics.median(alone + question_times(url, registry))


def test_a_document_without_sentence_breaks_leaves_questions_within_twice_their_time(open_server, registry):
    url = open_server
    unbroken = ["hello world. " * 15_000]  # 195 KB, one "sentence" to the splitter: cut into 500 pieces
    outcomes = []
    senders = [threading.Thread(target=lambda text=text: outcomes.append(httpx.post(
        f"{url}/translate", json={"q": text, "target": "ja"}, timeout=900))) for text in unbroken]

    def flood():
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while not registry.en_ja.busy and time.monotonic() < deadline:
            time.sleep(0.05)

    alone, beside = compared(url, registry, flood, lambda: any(sender.is_alive() for sender in senders))
    for sender in senders:
        sender.join(timeout=900)
    assert [response.status_code for response in outcomes] == [200]
    print(f"question alone {alone:.3f} s, beside unbroken documents {beside:.3f} s (medians)")
    assert beside <= 2 * alone, f"median {beside:.3f} s beside the documents, {alone:.3f} s alone"


def test_detect_requests_count_in_the_queue_limit(registry):
    from pipeline.serve.app import ServerConfig, create_app

    server, thread, url = start_server(create_app(registry, ServerConfig(max_queue=8)))
    text = "The committee said that prices and wages would keep rising through the year. " * 2000  # 156 KB
    socks = [raw_post(url, "/detect", {"q": f"{text} {i}"}) for i in range(24)]
    try:
        statuses = [_status(sock) for sock in socks]
        assert statuses.count(200) >= 8 and statuses.count(503) >= 8, statuses
    finally:
        for sock in socks:
            sock.close()
        server.should_exit = True
        thread.join(timeout=30)


def test_a_detect_flood_leaves_questions_within_twice_their_time(open_server, registry):
    url = open_server
    text = "The committee said that prices and wages would keep rising through the year. " * 2000  # 156 KB
    socks: list[socket.socket] = []
    try:
        def flood():
            socks.extend(raw_post(url, "/detect", {"q": f"{text} {i}"}) for i in range(150))

        alone, beside = compared(url, registry, flood, lambda: any(_unanswered(sock) for sock in socks))
        assert [_status(sock) for sock in socks] == [200] * 150
        print(f"question alone {alone:.3f} s, beside 150 /detect of 156 KB {beside:.3f} s (medians)")
        assert beside <= 2 * alone, f"median {beside:.3f} s beside the /detect flood, {alone:.3f} s alone"
    finally:
        for sock in socks:
            sock.close()


def _unanswered(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # data, or b"" once closed: answered either way
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def _status(sock: socket.socket) -> int | None:
    sock.settimeout(60)
    head = sock.recv(64)
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
