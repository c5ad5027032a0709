"""What the server tests share besides fixtures (imported by name: pytest puts tests/serve/ on the
path for the tests in it)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from pipeline import GenerationSettings

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOKENS = 16
SETTINGS = GenerationSettings(max_new_tokens=TOKENS)
QUESTIONS = ["金利が上昇すると、経済にどのような影響がありますか？", "What is a bond?",
             "How do banks make money when interest rates rise?", "インフレとは何ですか？"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comparable(result: dict) -> dict:
    """A result without its timings (the only field that differs between two runs) and its models
    (a server names them, `BilingualQA` gives their locators)."""
    return {key: value for key, value in result.items() if key not in ("timings", "models")}


def start_server(app, limits=None):
    """`app` under uvicorn on a free loopback port, on a thread; with `limits` (server.ConnectionLimits),
    configured as `bilingual-qa serve` configures it."""
    import uvicorn

    from pipeline.serve.server import uvicorn_config

    port = free_port()
    if limits is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    else:
        config = uvicorn_config(app, "127.0.0.1", port, limits, "warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    return server, thread, f"http://127.0.0.1:{port}"


@contextmanager
def base_and_adapter_server(phi2_dir, lora_dir, ja_en_dir, en_ja_dir):
    """A server of its own (no key) over the tiny phi-2 and a LoRA adapter of it, loaded as `serve --llm
    PHI2 --llm ADAPTER` loads them (one copy of the base, one batch), with the options of conftest's
    `qa`; yields its URL, and stops it and frees its models after."""
    from pipeline.serve.app import create_app
    from pipeline.serve.models import LoadOptions, ModelRegistry

    own = ModelRegistry.load(LoadOptions(llms=[str(phi2_dir), str(lora_dir)], ja_en=str(ja_en_dir),
                                         en_ja=str(en_ja_dir), device="cpu", engine="transformers",
                                         mt_backend="transformers", beams=1, max_rows=16))
    server, thread, url = start_server(create_app(own))
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        own.close()
