"""`bilingual-qa tiny-models DIR`: tiny real-format checkpoints and the exports that point the CLI at
them, so a newcomer sees every command run without the 6 GB download."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli_tiny_models import NAMES

EXECUTABLE = shutil.which("bilingual-qa", path=str(Path(sys.executable).parent)) or "bilingual-qa"


def shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BILINGUAL_QA_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(["bash", "-c", script.replace("bilingual-qa", EXECUTABLE)], capture_output=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    home = tmp_path_factory.mktemp("newcomer")
    return home, shell("bilingual-qa tiny-models", home)


def test_tiny_models_builds_each_model_and_prints_exports_that_name_them(built):
    home, proc = built
    assert proc.returncode == 0, proc.stderr.decode()
    exported = dict(re.findall(r"^export (\w+)=(\S+)$", proc.stdout.decode(), re.M))
    folder = home / "tiny-models"
    assert exported == {"BILINGUAL_QA_LLM": str(folder / NAMES["llm"]),
                        "BILINGUAL_QA_JA_EN": str(folder / NAMES["ja_en"]),
                        "BILINGUAL_QA_EN_JA": str(folder / NAMES["en_ja"])}
    for name in NAMES.values():
        assert (folder / name).is_dir(), name
    assert (folder / NAMES["llm"] / "model.safetensors").is_file()
    assert (folder / NAMES["adapter"] / "adapter_config.json").is_file()
    assert "the answers are noise, the plumbing is real" in proc.stdout.decode()


def test_eval_of_the_exports_runs_ask_and_compare_on_the_tiny_models(built):
    home, _ = built
    proc = shell('eval "$(bilingual-qa tiny-models --quiet)" && '
                 'bilingual-qa ask "金利が上がると何が起きますか？" --max-new-tokens 8 --format json && '
                 'bilingual-qa compare "What is a bond?" --llm "$BILINGUAL_QA_LLM" '
                 '--llm tiny-models/phi-2-finance-lora --max-new-tokens 8', home)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert f'"llm": "{home / "tiny-models" / "phi-2"}"' in out
    assert "=== tiny-models/phi-2-finance-lora (LoRA adapter on" in out
    assert "already holds the tiny models" not in proc.stderr.decode()  # --quiet


def test_a_second_run_reuses_the_set_and_a_foreign_directory_is_refused(built):
    home, first = built
    again = shell("bilingual-qa tiny-models", home)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "already holds the tiny models" in again.stderr.decode()
    (home / "mine").mkdir()
    (home / "mine" / "notes.txt").write_text("keep me")
    refused = shell("bilingual-qa tiny-models mine", home)
    lines = refused.stderr.decode().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "is not empty" in lines[0], lines
    assert sorted(p.name for p in (home / "mine").iterdir()) == ["notes.txt"]


def test_tiny_models_help_imports_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "tiny-models", "--help"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0 and b"the plumbing is" in proc.stdout
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()
               if line.startswith("import time:")}
    assert "pipeline.cli_tiny_models" in modules and not modules & {"torch", "transformers"}


def test_a_tiny_adapter_naming_a_hub_base_is_built_without_looking_the_base_up(tiny_phi2_dir, tmp_path):
    """peft's default would fetch the base's config from the hub to check the vocabulary (a warning
    offline, a network call online); a tiny adapter never resizes it."""
    import warnings

    from pipeline.checkpoints import build_lora_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_lora_adapter(tmp_path / "adapter", tiny_phi2_dir, base_name="microsoft/phi-2")
    assert not [w for w in caught if "config file" in str(w.message)], [str(w.message) for w in caught]
