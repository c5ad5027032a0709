"""A run killed with kill -9 goes on where it stopped: the same adapter tensors as a run never
killed, Japanese sides translated once, an unfinished run of other options refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from cli_run import assert_one_line_error, run_cli
from train_support import PAIRS, write_jsonl

CRASH_DRIVER = os.path.join(os.path.dirname(__file__), "crash_driver.py")
# Two pairs train (one held out), one sequence of 64 tokens a step: 2 steps an epoch, 8 in all;
# LoRA dropout on, so the random generators' states must come back exactly too.
RESUMABLE = ["--epochs", "4", "--learning-rate", "5e-3", "--lora-dropout", "0.1", "--max-length", "64",
             "--batch-tokens", "64", "--eval-fraction", "0.34", "--save-every", "3", "--device", "cpu",
             "--mt-backend", "transformers", "--beams", "1"]


def killed_at(point: str, occurrence: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, CRASH_DRIVER, point, str(occurrence), *args], capture_output=True, env=env,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    return proc


def tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_a_run_killed_mid_training_resumes_to_the_same_adapter_tensors(tmp_path, tiny_phi2_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    base = ["--llm", str(tiny_phi2_dir), *RESUMABLE]
    whole = run_cli("finetune", str(data), "-o", str(tmp_path / "whole"), *base)
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    resumed = tmp_path / "resumed"
    killed_at("after_step", 5, "finetune", str(data), "-o", str(resumed), *base)  # checkpoint at step 3
    assert not resumed.exists()  # never half an adapter
    assert (tmp_path / "resumed.checkpoint.pt").exists() and (tmp_path / "resumed.progress.json").exists()
    other = run_cli("finetune", str(data), "-o", str(resumed), *base, "--epochs", "5")
    assert_one_line_error(other, "has an unfinished run with other options (epochs)", "--restart")
    again = run_cli("finetune", str(data), "-o", str(resumed), *base)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert "resuming at step 3 of 8" in again.stderr.decode()

    first, second = tensors(tmp_path / "whole"), tensors(resumed)
    assert sorted(first) == sorted(second) and len(first) == 2 * 6 * 2  # A and B of 6 layers, 2 blocks
    assert all(torch.equal(first[key], second[key]) for key in first)
    cards = [json.loads((d / "finetune.json").read_text()) for d in (tmp_path / "whole", resumed)]
    assert cards[0]["epochs"] == cards[1]["epochs"] and cards[0]["epochs"][-1]["eval_loss"] is not None
    assert not (tmp_path / "resumed.checkpoint.pt").exists() and not (tmp_path / "resumed.progress.json").exists()


def test_japanese_pairs_are_translated_once_and_reused_on_resume_and_restart(tmp_path, tiny_phi2_dir, tiny_ja_en_dir):
    data = write_jsonl(tmp_path / "ja.jsonl", [
        {"question": "円安とは何ですか？", "answer": "円安は日本の輸出品を海外で安くします。"},
        {"question": "インフレとは何ですか？", "answer": "Inflation is the rate at which prices rise."},
        {"question": PAIRS[0][0], "answer": PAIRS[0][1]}])
    args = ["finetune", str(data), "-o", str(tmp_path / "ja-adapter"), "--llm", str(tiny_phi2_dir), "--ja-en",
            str(tiny_ja_en_dir), "--epochs", "2", "--max-length", "2048", "--batch-tokens", "2048", "--device", "cpu",
            "--mt-backend", "transformers", "--beams", "1", "--save-every", "1", "--eval-fraction", "0"]
    first = killed_at("after_save", 1, *args)
    assert f"loading {tiny_ja_en_dir}" in first.stderr.decode()
    pairs_file = tmp_path / "ja-adapter.pairs.jsonl"
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert [p["languages"] for p in pairs] == [["ja", "ja"], ["ja", "en"], ["en", "en"]]
    assert pairs[0]["original"] == {"question": "円安とは何ですか？", "answer": "円安は日本の輸出品を海外で安くします。"}
    written = pairs_file.read_bytes()

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert f"loading {tiny_ja_en_dir}" not in resumed.stderr.decode() and "resuming at step 1" in resumed.stderr.decode()
    for changed in (["--epochs", "3"], ["--max-length", "2000"]):  # the pairs kept, or re-made from what they hold
        proc = run_cli(*args, *changed, "--restart")
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert f"loading {tiny_ja_en_dir}" not in proc.stderr.decode()
        assert pairs_file.read_bytes() == written
