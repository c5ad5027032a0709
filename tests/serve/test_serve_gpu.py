"""A server on a GPU as `bilingual-qa serve` loads one by default: --device auto (torch.device("cuda"),
no card number) and --gpu-memory's default cap, which once stopped every GPU server at start."""

from __future__ import annotations

import pytest
import torch

from serve_support import QUESTIONS, SETTINGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_server_on_the_default_device_and_memory_cap_loads_and_answers(tiny_phi2_dir, tiny_ja_en_dir,
                                                                        tiny_en_ja_dir):
    from starlette.testclient import TestClient

    from pipeline.serve.app import ServerConfig, create_app
    from pipeline.serve.models import LoadOptions, ModelRegistry

    registry = ModelRegistry.load(LoadOptions(llms=[str(tiny_phi2_dir)], ja_en=str(tiny_ja_en_dir),
                                              en_ja=str(tiny_en_ja_dir), max_rows=8))
    try:
        with TestClient(create_app(registry, ServerConfig()), base_url="http://127.0.0.1") as client:
            asked = client.post("/v1/ask", json={"question": QUESTIONS[0], "max_new_tokens": SETTINGS.max_new_tokens})
        assert asked.status_code == 200, asked.text
        assert asked.json()["answer_en"] is not None and asked.json()["answer_ja"] is not None
    finally:
        registry.close()
