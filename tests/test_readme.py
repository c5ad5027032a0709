"""The README is the front door: its commands must work as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def readme_commands() -> list[str]:
    return [line.split("  #")[0].strip() for block in bash_blocks() for line in block.splitlines()
            if "bilingual-qa " in line and not line.lstrip().startswith("#")]


def test_install_command_is_the_one_ci_runs():
    install = next(line for block in bash_blocks() for line in block.splitlines() if "pip install" in line)
    pip_args = install.split("pip install", 1)[1].strip()
    assert f"pip install --quiet {pip_args}" in (ROOT / ".ci" / "run").read_text()


def test_test_command_is_the_one_ci_runs():
    assert "pytest\n" in bash_blocks()
    assert re.search(r"^HF_HUB_OFFLINE=1 pytest$", (ROOT / ".ci" / "run").read_text(), re.M)


@pytest.fixture(scope="session")
def hub_models(tiny_models_dir, tiny_phi2_dir) -> dict[str, Path]:
    """Tiny stand-ins, under their hub ids, for the models of the article's comparison: phi-2 and
    the finance fine-tune, a LoRA adapter whose adapter_config.json names microsoft/phi-2 as its base."""
    from pipeline.checkpoints import build_lora_adapter

    adapter = build_lora_adapter(tiny_models_dir / "phi2_finance_SFT", tiny_phi2_dir, base_name="microsoft/phi-2")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the published adapter ships its tokenizer
        shutil.copy(tiny_phi2_dir / name, adapter / name)
    return {"microsoft/phi-2": tiny_phi2_dir, "Ronal999/phi2_finance_SFT": adapter}


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir, hub_models, tmp_path):
    """Commands that name no model run on the tiny checkpoints (set as the defaults through the
    environment variables); so do commands that name only the article's hub models (tiny stand-ins
    put in the hub cache, found offline as a download would be); commands that name directories
    this machine lacks must fail with the one-line error that says how to pass a local directory."""
    from pipeline.checkpoints import seed_hub_cache

    for repo_id, directory in hub_models.items():
        seed_hub_cache(tmp_path / "hub", repo_id, directory)
    executable = shutil.which("bilingual-qa", path=str(Path(sys.executable).parent)) or "bilingual-qa"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path),
           "BILINGUAL_QA_LLM": str(tiny_phi2_dir), "BILINGUAL_QA_JA_EN": str(tiny_ja_en_dir),
           "BILINGUAL_QA_EN_JA": str(tiny_en_ja_dir)}
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    quick = " --beams 1" if " translate " in command else " --max-new-tokens 8 --beams 1"
    shell = command.replace("bilingual-qa", executable, 1) + quick
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, env=env, timeout=300, cwd=tmp_path)
    named = re.findall(r"--(?:llm|base|ja-en|en-ja) (\S+)", command)
    if any(name not in hub_models for name in named):
        assert proc.returncode == 2 and b"Traceback" not in proc.stderr, proc.stderr.decode()
        assert b"pass a local directory" in proc.stderr or b"does not exist" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr.decode()
        outputs = (".txt", ".jsonl", ".md", ".html", ".srt", ".vtt", ".docx")  # rows, or a document
        written = [p for p in tmp_path.iterdir() if p.suffix in outputs and p.stat().st_size]
        assert proc.stdout.strip() or written  # an answer on stdout, or a job's output file


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_python_block_runs(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir, tmp_path):
    """The Python API block, as written, with one documented substitution: the hub ids it names become
    the tiny checkpoints (the models it leaves to the defaults come from BILINGUAL_QA_*). Each
    `print(...)  # "value"` must print that value."""
    [block] = [block for block in python_blocks() if block.startswith("from pipeline import")]
    swaps = {"microsoft/phi-2": tiny_phi2_dir, "Helsinki-NLP/opus-mt-ja-en": tiny_ja_en_dir}
    code = block
    for hub_id, directory in swaps.items():
        assert f'"{hub_id}"' in code
        code = code.replace(f'"{hub_id}"', repr(str(directory)))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BILINGUAL_QA_LLM": str(tiny_phi2_dir),
           "BILINGUAL_QA_JA_EN": str(tiny_ja_en_dir), "BILINGUAL_QA_EN_JA": str(tiny_en_ja_dir)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    printed = proc.stdout.decode().splitlines()
    promised = re.findall(r'^print\(.*\)\s+# "([^"]+)"', block, re.M)
    assert promised == ["ja", "zh"]
    found = [line for line in printed if line in promised]
    assert found == promised, printed
    assert (tmp_path / "questions_en.txt").stat().st_size > 0
