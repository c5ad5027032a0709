"""Session fixtures: tiny checkpoints in the published formats, built once, and an offline hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before transformers or huggingface_hub is imported anywhere: no test may reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# CTranslate2 conversions (the CPU translation backend) go to a throwaway cache, not the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bilingual-qa-test-cache-")

from pipeline.checkpoints import build_tiny_marian, build_tiny_phi2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_phi2_dir(tiny_models_dir) -> Path:
    return build_tiny_phi2(tiny_models_dir / "phi-2")


@pytest.fixture(scope="session")
def tiny_ja_en_dir(tiny_models_dir) -> Path:
    return build_tiny_marian(tiny_models_dir / "opus-mt-ja-en", "ja", "en")


@pytest.fixture(scope="session")
def tiny_en_ja_dir(tiny_models_dir) -> Path:
    return build_tiny_marian(tiny_models_dir / "fugumt-en-ja", "en", "ja")


@pytest.fixture(scope="session")
def model_args(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir) -> list[str]:
    """CLI options that point every stage at the tiny checkpoints."""
    return ["--llm", str(tiny_phi2_dir), "--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir)]


@pytest.fixture(scope="session")
def qa(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    """The whole pipeline on the tiny checkpoints, loaded once (as a process would)."""
    from pipeline import BilingualQA

    return BilingualQA.from_pretrained(str(tiny_phi2_dir), str(tiny_ja_en_dir), str(tiny_en_ja_dir),
                                       device="cpu", engine="transformers", mt_backend="transformers",
                                       beams=1)


@pytest.fixture(scope="session")
def answer_samples():
    """The phi-2-style outputs of tests/text/answer_corpus.py, each with its question and expected answer."""
    import importlib.util
    import sys

    if "answer_corpus" not in sys.modules:  # tests/text imports it by name, from beside its tests
        spec = importlib.util.spec_from_file_location("answer_corpus", Path(__file__).parent / "text" / "answer_corpus.py")
        sys.modules["answer_corpus"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["answer_corpus"])
    return sys.modules["answer_corpus"].SAMPLES


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_models_dir, tiny_phi2_dir) -> Path:
    """A LoRA adapter of the tiny phi-2 (q/k/v/dense/fc1/fc2, r=8), made by peft, B non-zero."""
    from pipeline.checkpoints import build_lora_adapter

    return build_lora_adapter(tiny_models_dir / "phi2-lora", tiny_phi2_dir)


@pytest.fixture(scope="session")
def tiny_lora_saved_head_dir(tiny_models_dir, tiny_phi2_dir) -> Path:
    """A LoRA adapter that also saves a trained lm_head (`modules_to_save`) and ships a tokenizer."""
    import shutil

    from pipeline.checkpoints import build_lora_adapter

    path = build_lora_adapter(tiny_models_dir / "phi2-lora-head", tiny_phi2_dir, r=4, seed=2,
                              targets=("q_proj", "v_proj"), modules_to_save=["lm_head"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_phi2_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_lora_second_dir(tiny_models_dir, tiny_phi2_dir) -> Path:
    """A second LoRA adapter of the same base, of another rank and other targets (r=4: q, v, fc2)."""
    from pipeline.checkpoints import build_lora_adapter

    return build_lora_adapter(tiny_models_dir / "phi2-lora-second", tiny_phi2_dir, r=4, seed=3, scale=0.1,
                              targets=("q_proj", "v_proj", "fc2"))


@pytest.fixture(autouse=True)
def fresh_once_notices():
    """Notes printed once per process (quiet.status(once=True)) print again in each test."""
    from pipeline import quiet

    quiet._shown_once.clear()
    yield
