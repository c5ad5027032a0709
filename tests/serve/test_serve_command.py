"""`bilingual-qa serve` in a real subprocess, as an operator runs it: the key never in its log, models
named not located, SIGTERM beside a stalled client, and the options that refuse a blank key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pipeline.serve.ready import wait_until_ready
from serve_support import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret-key-4711"


def start_serve(model_args: list[str], *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--device", "cpu",
                             "--engine", "transformers", "--mt-backend", "transformers", *model_args, *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, process=proc)
    return proc, url


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.stdout.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def keyed_serve(model_args):
    """One server with a key and a served name for its model, its whole log read at the end."""
    proc, url = start_serve(model_args, "--api-key", SECRET, "--served-model-name", "finance-qa")
    yield proc, url
    stop(proc)


def test_models_are_named_never_located(keyed_serve, tiny_models_dir):
    proc, url = keyed_serve
    bearer = {"Authorization": f"Bearer {SECRET}"}
    listed = httpx.get(f"{url}/v1/models", headers=bearer, timeout=30).json()
    answer = httpx.post(f"{url}/v1/ask", json={"question": "What is a bond?", "max_new_tokens": 8}, headers=bearer,
                        timeout=120).json()
    unknown = httpx.post(f"{url}/v1/ask", json={"question": "What is a bond?", "model": "phi-2"}, headers=bearer,
                         timeout=30).json()
    assert [model["id"] for model in listed["data"]] == ["finance-qa"]
    assert answer["models"] == {"llm": "finance-qa", "ja_en": "opus-mt-ja-en", "en_ja": "fugumt-en-ja"}
    assert "finance-qa" in unknown["error"]
    for text in (str(listed), str(answer), str(unknown)):
        assert str(tiny_models_dir) not in text and "/tmp" not in text


def test_the_key_never_reaches_the_log_wherever_it_is_sent(keyed_serve):  # last: it stops the server
    proc, url = keyed_serve
    bearer = {"Authorization": f"Bearer {SECRET}"}
    sent = [
        httpx.get(f"{url}/v1/models?api_key={SECRET}", timeout=30),
        httpx.get(f"{url}/metrics?x=1&api_key={SECRET}&y=2", timeout=30),
        httpx.get(f"{url}/health?API_KEY={SECRET}", timeout=30),
        httpx.post(f"{url}/detect?api_key={SECRET}", data={"q": "hello there"}, timeout=30),
        httpx.post(f"{url}/detect", data={"q": "hello there", "api_key": SECRET}, timeout=30),
        httpx.post(f"{url}/translate?api_key={SECRET}x", json={"q": "hi", "target": "ja"}, timeout=30),
        httpx.post(f"{url}/v1/ask", content=b'{"question": "\\ud800"}', timeout=30,
                   headers={**bearer, "Content-Type": "application/json"}),
        httpx.get(f"{url}/v1/models", headers=bearer, timeout=30),
        httpx.get(f"{url}/v1/models?api%5Fkey={SECRET}", timeout=30),  # percent-escaped names authenticate
        httpx.get(f"{url}/v1/models?%61pi_key={SECRET}", timeout=30),
        httpx.get(f"{url}/v1/models?x=1;api_key={SECRET}", timeout=30),  # no key to the parser: refused
        httpx.get(f"{url}/v1/models?token={SECRET}", timeout=30),
        httpx.get(f"{url}/v1/models?api-key=%{ord(SECRET[0]):02X}{SECRET[1:]}", timeout=30),
    ]
    assert [response.status_code for response in sent] == [200, 200, 200, 200, 200, 401, 400, 200,
                                                            200, 200, 401, 401, 401]
    log = stop(proc)
    assert SECRET not in log
    assert "api_key=REDACTED" in log and "GET /v1/models" in log  # the access lines are there, redacted


def test_sigterm_with_a_stalled_client_exits_within_the_shutdown_timeout(model_args):
    proc, url = start_serve(model_args, "--shutdown-timeout", "3")
    host, port = url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    try:
        stalled.sendall(b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"q\": \"hel")  # and nothing more: the body never ends
        idle = socket.create_connection((host, int(port)))
        time.sleep(0.5)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - began
    finally:
        stalled.close()
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and took < 3 + 8, f"exit {code} after {took:.1f} s"
    idle.close()


@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_a_blank_api_key_is_no_key(key):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--host", "0.0.0.0", "--api-key", key],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "without an API key" in proc.stderr


def test_two_models_under_one_served_name_are_refused_in_one_line(model_args, second_phi2_dir):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "serve", *model_args, "--llm", str(second_phi2_dir),
                           "--served-model-name", "qa", "--served-model-name", "qa"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "served as 'qa'" in proc.stderr


def test_sigterm_cuts_what_outlasts_the_shutdown_timeout_and_exits_0_on_time(model_args):
    proc, url = start_serve(model_args, "--shutdown-timeout", "2")
    long_answer = {"question": "What is a bond?", "max_new_tokens": 1500, "raw": True}
    outcome: dict = {}

    def whole():
        outcome["whole"] = httpx.post(f"{url}/v1/ask", json=long_answer, timeout=60)

    def streamed():
        with httpx.stream("POST", f"{url}/v1/ask", json={**long_answer, "stream": True}, timeout=60) as response:
            outcome["stream"] = [line for line in response.iter_lines() if line.startswith("event: ")]

    askers = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for asker in askers:
        asker.start()
    time.sleep(2)  # both answers decoding
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    took = time.monotonic() - began
    for asker in askers:
        asker.join(timeout=30)
    log = proc.stdout.read().decode("utf-8", "replace")
    assert code == 0 and took < 2 + 1.5, f"exit {code} after {took:.1f} s"
    whole_response = outcome["whole"]
    assert whole_response.status_code == 503 and whole_response.headers["retry-after"]
    assert "shutting down" in whole_response.json()["error"]
    assert outcome["stream"][0] == "event: question" and outcome["stream"][-1] == "event: error"
    assert log.count("shutting down: POST /v1/ask cut") == 2
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
