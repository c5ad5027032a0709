"""Connections nobody can hold, bodies every client reads the 413 of, and no other site's page let in:
a real uvicorn server on loopback, configured as `bilingual-qa serve` does, with short timeouts."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import httpx
import pytest

from serve_support import start_server

LIMITS = dict(keep_alive_timeout=1.0, header_timeout=1.5, body_timeout=2.0, max_connections=16, shutdown_timeout=5)
MAX_BODY = 100_000


@pytest.fixture(scope="module")
def guarded(registry):
    """No key (as on one's own machine), short timeouts, 16 connections, another allowed host and origin."""
    from pipeline.serve.app import ServerConfig, create_app
    from pipeline.serve.server import ConnectionLimits

    config = ServerConfig(max_body=MAX_BODY, bound_host="127.0.0.1", allowed_hosts=("serve.lan",),
                          cors_origins=("https://app.example",))
    server, thread, url = start_server(create_app(registry, config), ConnectionLimits(**LIMITS))
    yield server, url
    server.should_exit = True
    thread.join(timeout=30)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.25, limit: float = 15) -> float:
    """Send `trickle` a byte every `every` seconds, reading, until the server closes the connection."""
    start, sent = time.monotonic(), 0
    sock.settimeout(every)
    while time.monotonic() - start < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            if sent < len(trickle):
                try:
                    sock.send(trickle[sent:sent + 1])
                    sent += 1
                except OSError:
                    return time.monotonic() - start
        except OSError:
            return time.monotonic() - start
    return float("inf")


def test_an_idle_connection_is_closed_after_the_header_timeout(guarded):
    with connect(guarded[1]) as sock:
        assert 1.2 < seconds_until_closed(sock) < 4


def test_a_slowly_sent_head_is_closed_after_the_header_timeout(guarded):
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    with connect(guarded[1]) as sock:
        assert 1.2 < seconds_until_closed(sock, head) < 4


def test_a_slowly_sent_body_is_closed_after_the_body_timeout(guarded):
    with connect(guarded[1]) as sock:
        sock.sendall(b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n")
        assert 1.7 < seconds_until_closed(sock, b'{"q": "' + b"a" * 400) < 5


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(guarded):
    with connect(guarded[1]) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert 0.7 < seconds_until_closed(sock) < 3


def test_open_connections_are_bounded_and_the_server_answers_once_they_go(guarded):
    server, url = guarded
    socks = [connect(url) for _ in range(40)]
    try:
        time.sleep(0.5)
        assert len(server.server_state.connections) <= LIMITS["max_connections"]
        closed = sum(seconds_until_closed(sock, limit=0.3) < 0.3 for sock in socks)
        assert closed >= 40 - LIMITS["max_connections"]
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_client_that_hangs_up_mid_body_is_not_a_500(guarded):
    url = guarded[1]
    for path in ("/v1/ask", "/translate"):
        with connect(url) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n{\"q\": \"hel".encode())
            time.sleep(0.3)
    time.sleep(0.5)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'code="500"' not in metrics
    assert 'bilingual_qa_requests_total{code="499",endpoint="/translate"}' in metrics


@pytest.mark.parametrize("client", ["urllib", "requests", "httpx"])
def test_every_common_client_reads_the_413_of_a_body_over_the_limit(guarded, client):
    url = f"{guarded[1]}/translate"
    body = json.dumps({"q": "x" * 1_500_000, "target": "ja"}).encode()
    headers = {"Content-Type": "application/json"}
    if client == "urllib":
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30)
        status, error = raised.value.code, json.loads(raised.value.read())["error"]
    elif client == "requests":
        requests = pytest.importorskip("requests")
        response = requests.post(url, data=body, headers=headers, timeout=30)
        status, error = response.status_code, response.json()["error"]
    else:
        response = httpx.post(url, content=body, headers=headers, timeout=30)
        status, error = response.status_code, response.json()["error"]
    assert status == 413 and f"limit of {MAX_BODY}" in error


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("[::1]:{port}", True), ("127.0.0.1", True),
    ("serve.lan:{port}", True), ("attacker.example:{port}", False), ("attacker.example", False),
    ("127.0.0.1.attacker.example", False), ("localhost.attacker.example:{port}", False),
])
def test_a_host_header_that_does_not_name_the_server_is_refused(guarded, host, allowed):
    url = guarded[1]
    response = httpx.post(f"{url}/detect", json={"q": "hello there"}, timeout=30,
                          headers={"Host": host.format(port=url.rsplit(":", 1)[1])})
    assert response.status_code == (200 if allowed else 403)
    if not allowed:
        assert "Host" in response.json()["error"]


def test_a_keyed_server_takes_any_host(live_server):
    response = httpx.get(f"{live_server}/health", headers={"Host": "api.example.com"}, timeout=30)
    assert response.status_code == 200


def test_other_sites_pages_are_refused_and_the_servers_own_page_is_not(guarded):
    url = guarded[1]
    body = {"q": "hello there"}
    own = httpx.post(f"{url}/detect", json=body, headers={"Origin": url}, timeout=30)
    other = httpx.post(f"{url}/detect", json=body, headers={"Origin": "https://attacker.example"}, timeout=30)
    null = httpx.post(f"{url}/detect", json=body, headers={"Origin": "null"}, timeout=30)
    lookalike = httpx.post(f"{url}/detect", json=body, headers={"Origin": url + ".attacker.example"}, timeout=30)
    assert own.status_code == 200
    for refused in (other, null, lookalike):
        assert refused.status_code == 403 and "not allowed" in refused.json()["error"]
        assert "access-control-allow-origin" not in refused.headers


def test_an_allowed_origin_gets_cors_headers_and_its_preflight_answered(guarded):
    url, origin = guarded[1], "https://app.example"
    preflight = httpx.options(f"{url}/v1/ask", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    response = httpx.post(f"{url}/detect", json={"q": "hello there"}, headers={"Origin": origin}, timeout=30)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
    evil = httpx.options(f"{url}/v1/ask", timeout=30, headers={
        "Origin": "https://attacker.example", "Access-Control-Request-Method": "POST"})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers


def test_no_redirect_is_built_from_the_host_header(guarded):
    url = guarded[1]
    for path in ("/health/", "/translate/", "/v1/models/"):
        response = httpx.get(f"{url}{path}", headers={"Host": "serve.lan"}, timeout=30, follow_redirects=False)
        assert response.status_code in (404, 405) and "location" not in response.headers
