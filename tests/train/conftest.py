"""Fixtures of the training tests: a tiny phi-2 whose output layer can separate tokens, pairs to
learn, and one adapter trained through the command, shared by the tests that load it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/cli_run.py, shared by the CLI tests

from cli_run import run_cli  # noqa: E402
from train_support import LEARN, PAIRS, write_jsonl  # noqa: E402 - beside this file


@pytest.fixture(scope="session")
def sharp_phi2_dir(tiny_models_dir, tiny_phi2_dir) -> Path:
    """The tiny phi-2 with its output layer's weights 25x larger. Random weights of 0.02 and a
    64-wide final layer norm cap every logit near 1.3, so no adapter of the blocks could make one
    token much likelier than the 640 others; a trained phi-2's output layer separates tokens, and
    this one can too."""
    from safetensors.torch import load_file, save_file

    path = tiny_models_dir / "phi-2-sharp"
    if not path.exists():
        shutil.copytree(tiny_phi2_dir, path)
        tensors = load_file(path / "model.safetensors")
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * 25
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sharp_phi2_dir, tiny_ja_en_dir):
    """The three pairs (and rows that cannot train) through `bilingual-qa finetune`, once."""
    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "pairs.jsonl", [
        {"question": q, "answer": a} for q, a in PAIRS[:2]] + [
        {"question": "What is a stock?"},  # line 3: no answer
        b"{not json\n",  # line 4
        {"question": PAIRS[2][0], "answer": PAIRS[2][1]},  # line 5
        {"question": "What is a loan?", "answer": "   "},  # line 6: empty answer
        b'{"question": "What is \xff?", "answer": "bad bytes"}\n',  # line 7: invalid UTF-8
        {"question": "금리가 오르면 어떻게 되나요?", "answer": "대출 비용이 늘어납니다."},  # line 8: Korean
        {"question": "What is the interest rate on a loan? " * 20, "answer": "Too long."},  # line 9: > 128 tokens
    ])
    output = root / "adapter"
    proc = run_cli("finetune", str(data), "--output", str(output), "--llm", str(sharp_phi2_dir),
                   "--ja-en", str(tiny_ja_en_dir), *LEARN)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return {"data": data, "output": output, "proc": proc}
