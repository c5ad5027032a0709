"""The scripts in examples/ run as their docstrings say, and are as quiet on a pipe as the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(*args: str, models: dict[str, Path]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BILINGUAL_QA_")}
    env |= {"HF_HUB_OFFLINE": "1", **{f"BILINGUAL_QA_{role}": str(path) for role, path in models.items()}}
    return subprocess.run([sys.executable, str(EXAMPLES / "ask_in_python.py"), *args], capture_output=True,
                          env=env, timeout=300)  # stderr a pipe, as in a log or CI


def test_the_python_example_answers_with_only_our_status_lines_on_a_pipe(tiny_phi2_dir, tiny_ja_en_dir,
                                                                         tiny_en_ja_dir):
    models = {"LLM": tiny_phi2_dir, "JA_EN": tiny_ja_en_dir, "EN_JA": tiny_en_ja_dir}
    proc = run_example("金利が上がると何が起きますか？", "--max-new-tokens", "8", models=models)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "### ---" in proc.stdout.decode() and "finish: " in proc.stdout.decode()
    lines = proc.stderr.decode().splitlines()
    assert lines and all(line.startswith("bilingual-qa: ") for line in lines), lines  # no bar, no warning
    quiet = run_example("What is a bond?", "--max-new-tokens", "8", "--quiet", models=models)
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr.decode()
