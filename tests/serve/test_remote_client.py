"""The --server client's connections (pipeline/remote/client.py) against small stdlib HTTP servers
that misbehave in the ways a real network does: a kept-alive connection the server has closed, and
an answer whose head comes later than the connect timeout."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.errors import ServerError
from pipeline.remote import client as remote_client


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless a side closes
    delay = 0.0
    close_after = False
    connections: set = set()

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).connections.add(self.client_address)
        time.sleep(self.delay)
        body = json.dumps({"status": "ok", "max_batch": 4}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        # Closes without saying so ("Connection: close"): what a server's idle timeout does.
        self.close_connection = self.close_after

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"connections": set()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_kept_alive_connection_is_reused(server):
    _, handler, url = server
    client = remote_client.ServerClient(url, connections=1)
    assert [client.health()["status"] for _ in range(3)] == ["ok"] * 3
    client.close()
    assert len(handler.connections) == 1


def test_a_pooled_connection_the_server_closed_is_replaced_not_failed(server):
    _, handler, url = server
    handler.close_after = True
    client = remote_client.ServerClient(url, connections=1)
    client.health()
    time.sleep(0.2)  # the server has closed its side by now
    assert client.health()["status"] == "ok"
    client.close()
    assert len(handler.connections) == 2


def test_an_answer_slower_than_the_connect_timeout_is_waited_for(server, monkeypatch):
    _, handler, url = server
    handler.delay = 0.6
    monkeypatch.setattr(remote_client, "CONNECT_SECONDS", 0.2)
    client = remote_client.ServerClient(url, connections=1)
    assert client.health()["status"] == "ok"
    client.close()


def test_an_answer_slower_than_the_read_timeout_is_one_line(server, monkeypatch):
    _, handler, url = server
    handler.delay = 0.6
    monkeypatch.setattr(remote_client, "READ_SECONDS", 0.2)
    client = remote_client.ServerClient(url, connections=1)
    with pytest.raises(ServerError, match="did not answer in time"):
        client.health()
    client.close()
