"""What a command that needs no model imports: `--help`, `--version`, `doctor --help` and the errors
found before any model loads import neither torch nor transformers nor the HTTP client (read from
`python -X importtime`, in a real process, as a user runs them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = {"torch", "transformers", "httpx", "sympy", "sklearn"}


def imported(*args: str, stdin: bytes = b"") -> tuple[set[str], subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", *args], input=stdin,
                          capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()
               if line.startswith("import time:")}
    return modules, proc


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["doctor", "--help"], ["ask", "--help"],
                                  ["translate", "--help"], []])
def test_help_and_version_import_no_torch(args):
    modules, proc = imported(*args)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "pipeline.cli" in modules  # the measurement saw the package's imports
    assert modules & HEAVY == set()


@pytest.mark.parametrize("args, message", [
    (["ask", ""], "the question is empty"),
    (["ask", "--stream", "--format", "json", "What is a bond?"], "--stream goes with --format text"),
    (["ask", "--batch", "questions.txt"], "--batch needs --output"),
    (["ask", "銀行们的利率"], "only Japanese (ja) and English (en)"),
    (["translate", "no-such-file.txt", "-o", "out.txt", "--to", "en"], "no such file"),
    (["translate", "in.csv", "-o", "out.csv", "--to", "en", "--field", "text"], "--field is for .jsonl"),
    (["nonsense"], "No such command"),
])
def test_errors_that_need_no_model_import_no_torch(args, message):
    modules, proc = imported(*args)
    assert proc.returncode == 2
    assert message in proc.stderr.decode()
    assert modules & HEAVY == set()


def test_ask_through_a_server_imports_neither_torch_nor_the_job_room():
    # Port 9 (discard) has no server on loopback: the unreachable-server line, after every import
    # the command makes on its way to the server.
    modules, proc = imported("ask", "--server", "http://127.0.0.1:9", "What is a bond?")
    assert proc.returncode == 2
    assert "cannot reach the server" in proc.stderr.decode()
    assert "pipeline.remote.client" in modules
    assert modules & HEAVY == set() and not any(name.startswith("pipeline.jobs") for name in modules)
