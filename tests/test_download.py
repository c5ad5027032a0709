"""A hub id not in the cache is downloaded with one "downloading" line, printed once its bytes arrive;
a model that cannot be fetched is one error line and nothing else. The hub is tests/fake_hub.py on
loopback (HF_ENDPOINT), so huggingface_hub's real download code runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub  # tests/fake_hub.py

REPO = "someone/tiny-phi-2"


def ask_with_hub(endpoint: str, tmp_path: Path, ja_en: Path, en_ja: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BILINGUAL_QA_", "HF_"))}
    env |= {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "BILINGUAL_QA_JA_EN": str(ja_en), "BILINGUAL_QA_EN_JA": str(en_ja)}
    env.pop("TRANSFORMERS_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "pipeline", "ask", "What is a bond?", "--llm", REPO,
                           "--max-new-tokens", "4", "--beams", "1", "--mt-backend", "transformers"],
                          capture_output=True, env=env, timeout=300)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens once the socket closes


def test_a_download_says_downloading_once_then_the_model_answers(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir,
                                                                 tmp_path):
    with FakeHub(REPO, tiny_phi2_dir) as hub:
        proc = ask_with_hub(hub.url, tmp_path, tiny_ja_en_dir, tiny_en_ja_dir)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert stderr.count(f"bilingual-qa: downloading {REPO} from the Hugging Face hub") == 1, stderr
    assert any(request.startswith(f"GET /{REPO}/resolve/") for request in hub.requests)
    assert proc.stdout.startswith(b"Q: What is a bond?")


@pytest.mark.parametrize("case", ["no hub", "no such repo", "files refused"])
def test_a_model_that_cannot_be_fetched_is_one_line(case, tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir, tmp_path):
    if case == "no hub":
        proc = ask_with_hub(f"http://127.0.0.1:{closed_port()}", tmp_path, tiny_ja_en_dir, tiny_en_ja_dir)
    else:
        repo = "someone/another-model" if case == "no such repo" else REPO
        with FakeHub(repo, tiny_phi2_dir, refuse_files=case == "files refused") as hub:
            proc = ask_with_hub(hub.url, tmp_path, tiny_ja_en_dir, tiny_en_ja_dir)
    stderr = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"", stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"bilingual-qa: error: model '{REPO}' "), stderr
    assert "downloading" not in stderr
