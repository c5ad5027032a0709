"""A server over the tiny checkpoints: two answer models sharing one pair of translators."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")

from pipeline import BilingualQA  # noqa: E402
from pipeline.checkpoints import build_tiny_phi2  # noqa: E402
from pipeline.llm.answerer import Answerer  # noqa: E402

from serve_support import KEY, QUESTIONS, SETTINGS, comparable, start_server  # noqa: E402 - tests/serve/serve_support.py


@pytest.fixture(scope="session")
def second_phi2_dir(tiny_models_dir):
    return build_tiny_phi2(tiny_models_dir / "phi-2-finance", layers=3)  # other weights: other answers


@pytest.fixture(scope="session")
def registry(qa, second_phi2_dir):
    from pipeline.serve.models import ModelRegistry

    other = Answerer.from_pretrained(str(second_phi2_dir), device="cpu", engine="transformers")
    return ModelRegistry({qa.answerer.name: qa, other.name: BilingualQA(other, qa.ja_en, qa.en_ja)}, max_rows=16)


@pytest.fixture(scope="session")
def alone(qa):
    """Each question's result asked alone through BilingualQA.ask, without timings."""
    return {question: comparable(qa.ask(question, settings=SETTINGS).to_dict()) for question in QUESTIONS}


@pytest.fixture(scope="session")
def live_server(registry):
    """A real uvicorn server on a free loopback port, with an API key."""
    from pipeline.serve.app import ServerConfig, create_app

    server, thread, url = start_server(create_app(registry, ServerConfig(api_key=KEY, max_queue=64)))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def client(registry):
    """Starlette's TestClient over the same models, with the key set."""
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app

    with TestClient(create_app(registry, ServerConfig(api_key=KEY, max_body=4096)),
                    raise_server_exceptions=False) as test_client:
        yield test_client
