"""The `bilingual-qa` command in a real subprocess, and the shape of its one-line errors: shared by
the CLI tests (imported by name: pytest puts tests/ on the path for the tests beside it)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], input=stdin, capture_output=True,
                          env=environment, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("bilingual-qa: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0]
    assert proc.stdout == b""  # nothing half-written
