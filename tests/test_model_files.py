"""Configs and tokenizers read without transformers (pipeline/model_files.py) are what transformers
reads from the same files, and files of any other shape are left to transformers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import ENGLISH_CORPUS, JAPANESE_CORPUS, PUBLISHED
from pipeline.model_files import CONFIG_DEFAULTS, CONFIG_KEYS, GENERATION_DEFAULTS, read_config, \
    read_generation_config, read_tokenizer

EDGE_TEXTS = ["", " ", "  spaced  out  ", "tab\tand\nnewline", "東京の株式市場</s>は<unk>午後", "x<pad>y</s>",
              ">>jpn<< 言語コード付き", "a >>eng<< code mid-text", "emoji 😀 and ％全角１２３", "it's a test , isn't it ?",
              "Ω≈ç√ unknown ☃ symbols", "def f(x):\n    return x  # code", "<|endoftext|>after end", "a . b"]
TEXTS = JAPANESE_CORPUS + ENGLISH_CORPUS + EDGE_TEXTS


def _transformers_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _random_ids(vocab: int, special: list[int], rows: int = 60) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.choice(special) if rng.random() < 0.15 else rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
            for _ in range(rows)]


def _assert_same_tokenizer(directory, special_ids: list[int]):
    ours, theirs = read_tokenizer(directory), _transformers_tokenizer(directory)
    assert ours is not None
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]
    for text in TEXTS:
        assert ours(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    rows = _random_ids(len(theirs), special_ids) + theirs(TEXTS)["input_ids"]
    for ids in rows:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids
        assert ours.decode(ids, clean_up_tokenization_spaces=False) == theirs.decode(ids, clean_up_tokenization_spaces=False)
        assert ours.decode(torch.tensor(ids, dtype=torch.long)) == theirs.decode(ids)  # as the engines hand them over
    return ours, theirs


@pytest.mark.parametrize("fixture", ["tiny_ja_en_dir", "tiny_en_ja_dir"])
def test_marian_tokenizer_encodes_and_decodes_as_transformers_marian_tokenizer(fixture, request):
    directory = request.getfixturevalue(fixture)
    theirs = _transformers_tokenizer(directory)
    ours, _ = _assert_same_tokenizer(directory, list(theirs.all_special_ids))
    assert (ours.target_lang, ours.pad_token_id) == (theirs.target_lang, theirs.pad_token_id)


def test_marian_tokenizer_with_clean_up_set_cleans_up_as_transformers(tiny_ja_en_dir, tmp_path):
    directory = _copy(tiny_ja_en_dir, tmp_path)
    _edit_json(directory / "tokenizer_config.json", clean_up_tokenization_spaces=True)
    _assert_same_tokenizer(directory, [0, 1])


def _copy(directory, tmp_path) -> Path:
    target = tmp_path / Path(directory).name
    shutil.copytree(directory, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def _edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_phi_tokenizer_encodes_and_decodes_as_transformers_codegen_tokenizer(tiny_phi2_dir):
    _assert_same_tokenizer(tiny_phi2_dir, [0])


def _phi2_like(tiny_phi2_dir, tmp_path) -> Path:
    """The tiny tokenizer with what phi-2's published files add: runs of spaces as added (not special)
    tokens in both files, clean_up_tokenization_spaces set, a special_tokens_map.json."""
    from tokenizers import AddedToken, Tokenizer

    directory = _copy(tiny_phi2_dir, tmp_path)
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_tokens([AddedToken(" " * n, normalized=True) for n in (2, 3, 4, 8)])
    backend.save(str(directory / "tokenizer.json"))
    added = {str(token["id"]): {key: token[key] for key in ("content", "lstrip", "normalized", "rstrip",
                                                            "single_word", "special")}
             for token in json.loads((directory / "tokenizer.json").read_text())["added_tokens"]}
    _edit_json(directory / "tokenizer_config.json", clean_up_tokenization_spaces=True, added_tokens_decoder=added,
               add_prefix_space=False)
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


def test_phi2_shaped_tokenizer_with_added_space_runs_is_read_as_transformers_reads_it(tiny_phi2_dir, tmp_path):
    ours, theirs = _assert_same_tokenizer(_phi2_like(tiny_phi2_dir, tmp_path), [0])
    assert ours.encode("a        b", add_special_tokens=False) == theirs.encode("a        b", add_special_tokens=False)


@pytest.mark.parametrize("change", [
    {"do_lower_case": True},                       # a setting these readers do not follow
    {"add_prefix_space": True},
    {"tokenizer_class": "LlamaTokenizer"},
    {"added_tokens_decoder": {"999": {"content": "<extra>", "special": True}}},  # a token tokenizer.json lacks
])
def test_phi_tokenizer_files_of_another_shape_are_left_to_transformers(tiny_phi2_dir, tmp_path, change):
    directory = _copy(tiny_phi2_dir, tmp_path)
    _edit_json(directory / "tokenizer_config.json", **change)
    assert read_tokenizer(directory) is None


@pytest.mark.parametrize("change", [
    {"separate_vocabs": True},
    {"sp_model_kwargs": {"enable_sampling": True}},
    {"added_tokens_decoder": {"5": {"content": "<extra>", "special": True}}},
    {"unk_token": "<missing>"},
])
def test_marian_tokenizer_files_of_another_shape_are_left_to_transformers(tiny_ja_en_dir, tmp_path, change):
    directory = _copy(tiny_ja_en_dir, tmp_path)
    _edit_json(directory / "tokenizer_config.json", **change)
    assert read_tokenizer(directory) is None


def test_a_special_tokens_map_with_more_special_tokens_is_left_to_transformers(tiny_ja_en_dir, tmp_path):
    directory = _copy(tiny_ja_en_dir, tmp_path)
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "additional_special_tokens": ["<x>"]}))
    assert read_tokenizer(directory) is None


def test_a_tokenizer_without_its_files_is_left_to_transformers(tiny_phi2_dir, tmp_path):
    directory = _copy(tiny_phi2_dir, tmp_path)
    (directory / "tokenizer.json").unlink()
    assert read_tokenizer(directory) is None


def _published(tmp_path, repo: str) -> Path:
    directory = tmp_path / repo
    directory.mkdir()
    shutil.copy(PUBLISHED / repo / "config.json", directory / "config.json")
    return directory


@pytest.mark.parametrize("repo", ["microsoft--phi-2", "Helsinki-NLP--opus-mt-ja-en"])
def test_published_configs_read_without_transformers_give_what_autoconfig_gives(repo, tmp_path):
    from transformers import AutoConfig

    from pipeline.llm.phi_weights import rope_settings

    directory = _published(tmp_path, repo)
    ours, theirs = read_config(directory), AutoConfig.from_pretrained(directory)
    assert ours is not None
    for key in CONFIG_KEYS[theirs.model_type]:
        assert getattr(ours, key) == getattr(theirs, key), key
    if theirs.model_type == "phi":
        assert rope_settings(ours) == rope_settings(theirs)


def test_the_config_defaults_used_are_transformers_own():
    from transformers import GenerationConfig, MarianConfig

    assert {key: getattr(MarianConfig(), key) for key in CONFIG_DEFAULTS["marian"]} == CONFIG_DEFAULTS["marian"]
    assert {key: getattr(GenerationConfig(), key) for key in GENERATION_DEFAULTS} == GENERATION_DEFAULTS


def test_a_config_missing_a_key_the_lean_path_reads_is_left_to_transformers(tmp_path):
    directory = _published(tmp_path, "microsoft--phi-2")
    values = json.loads((directory / "config.json").read_text())
    del values["rope_theta"]
    (directory / "config.json").write_text(json.dumps(values))
    assert read_config(directory) is None
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert read_config(directory) is None


def test_generation_config_without_its_file_comes_from_the_model_config_as_transformers_makes_it(tmp_path):
    from transformers import AutoConfig, GenerationConfig

    directory = _published(tmp_path, "Helsinki-NLP--opus-mt-ja-en")
    ours = read_generation_config(directory, read_config(directory))
    theirs = GenerationConfig.from_model_config(AutoConfig.from_pretrained(directory))
    assert {key: getattr(ours, key) for key in GENERATION_DEFAULTS} == \
        {key: getattr(theirs, key) for key in GENERATION_DEFAULTS}
