"""Every route declares its access in one place (routes.py), a refused caller costs almost nothing, and
the smaller HTTP holes of issue 33 are closed: framing, Host, control characters, one seed range."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from serve_support import AUTH, KEY, start_server


def test_every_route_of_the_app_declares_its_access(registry):
    from pipeline.serve.app import create_app
    from pipeline.serve.routes import KEYED, MODEL, OPEN

    app = create_app(registry)
    access = {route.path: getattr(route.endpoint, "access", None) for route in app.routes}
    assert set(access.values()) <= {MODEL, KEYED, OPEN}, access
    assert {path for path, kind in access.items() if kind == MODEL} == {
        "/v1/ask", "/translate", "/detect", "/v1/chat/completions"}
    assert {path for path, kind in access.items() if kind == OPEN} == {
        "/", "/favicon.svg", "/favicon.ico", "/health", "/languages"}


def test_names_nothing_reads_are_gone():
    from pipeline.serve import http, server

    for module, name in [(http, "OPEN_PATHS"), (http, "check_key"), (http, "model_request"), (server, "_KEY_IN_QUERY")]:
        assert not hasattr(module, name), name


def head_only(url: str, path: str, headers: str) -> bytes:
    """A request's head promising a body of a megabyte that never comes; the first answer within 5 s."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 1000000\r\n{headers}\r\n".encode())
        return sock.recv(4096)


@pytest.mark.parametrize("path, headers", [
    ("/v1/ask", "Authorization: Bearer wrong\r\n"),
    ("/v1/ask", ""),
    ("/v1/chat/completions", "Authorization: Basic dGVzdA==\r\n"),
    ("/translate", "Authorization: Bearer wrong\r\n"),
    ("/translate?api_key=wrong", ""),
    ("/detect?api%5Fkey=wrong", ""),
])
def test_a_wrong_or_missing_key_is_refused_on_the_headers_alone(live_server, path, headers):
    assert head_only(live_server, path, headers).startswith(b"HTTP/1.1 401")


def test_a_body_without_a_key_is_refused_before_it_is_parsed(live_server, monkeypatch):
    from pipeline.serve import bodies

    parsed = []
    for name in ("_json_fields", "_form_fields"):
        real = getattr(bodies, name)
        monkeypatch.setattr(bodies, name, lambda body, real=real: parsed.append(len(body)) or real(body))
    nested = b'{"q": "hi", "x": [' + b"[]," * 300_000 + b"[]]}"
    refused = httpx.post(f"{live_server}/translate", content=nested, timeout=30,
                         headers={"Content-Type": "application/json"})
    form = httpx.post(f"{live_server}/detect", data={"q": "hello there " * 5000}, timeout=30)
    assert refused.status_code == 401 and form.status_code == 401 and parsed == []
    keyed = httpx.post(f"{live_server}/detect", data={"q": "hello there", "api_key": KEY}, timeout=30)
    assert keyed.status_code == 200 and parsed


def test_a_megabyte_of_nested_arrays_is_refused_at_once_and_leaves_the_loop_free(live_server):
    wide = b'{"q": "hello there", "x": [' + b"[]," * 320_000 + b"[]]}"  # took 1.3 s to parse and walk
    outcomes = []
    senders = [threading.Thread(target=lambda: outcomes.append(httpx.post(
        f"{live_server}/detect", content=wide, headers={**AUTH, "Content-Type": "application/json"}, timeout=120)))
        for _ in range(8)]
    for sender in senders:
        sender.start()
    slowest = 0.0
    while any(sender.is_alive() for sender in senders):
        began = time.perf_counter()
        assert httpx.get(f"{live_server}/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.05)
    assert [response.status_code for response in outcomes] == [400] * 8
    assert "arrays and objects" in outcomes[0].json()["error"]
    assert slowest < 1.5, f"/health took {slowest:.2f} s while the bodies were read"


def raw_exchange(url: str, request: bytes) -> tuple[bytes, bool]:
    """The server's answer to `request` and whether it then closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
            return answer, True
        except socket.timeout:
            return answer, False


@pytest.mark.parametrize("head", [
    b"POST /detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"POST /detect HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n",
])
def test_ambiguous_framing_is_a_400_and_the_connection_closes(live_server, head):
    body = b'{"q": "hello there"}'
    request = (head + b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
               + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    answer, closed = raw_exchange(live_server, request)
    assert answer.split(b"\r\n")[0].endswith(b"400 Bad Request") and closed, answer[:200]


@pytest.mark.parametrize("host", ["127.0.0.1:80@evil.example", "localhost@evil.example", "127.0.0.1/evil"])
def test_a_host_with_userinfo_or_a_path_is_not_loopback(registry, host):
    from pipeline.serve.app import ServerConfig, create_app

    server, thread, url = start_server(create_app(registry, ServerConfig(bound_host="127.0.0.1")))
    try:
        response = httpx.get(f"{url}/health", headers={"Host": host}, timeout=30)
        assert response.status_code == 403 and "Host" in response.json()["error"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_control_character_in_a_question_reports_its_own_code(client):
    response = client.post("/v1/ask", json={"question": "What is\u0007 a bond?"}, headers=AUTH)
    body = response.json()
    assert response.status_code == 400 and body["code"] == "control_character" and "U+0007" in body["error"]
    assert client.post("/v1/ask", json={"question": "  "}, headers=AUTH).json()["code"] == "empty"


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, "99999999999"])
def test_every_seed_out_of_range_names_one_range(client, seed):
    response = client.post("/v1/ask", json={"question": "What is a bond?", "seed": seed}, headers=AUTH)
    assert response.status_code == 400 and "[0, 4294967295]" in response.json()["error"]


def test_a_tiny_temperature_is_raised_to_the_floor_not_a_500(client):
    for temperature in (1e-300, 5e-324, "1e-300"):
        response = client.post("/v1/ask", json={"question": "What is a bond?", "temperature": temperature,
                                               "seed": 1, "max_new_tokens": 4}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert json.dumps(response.json())
