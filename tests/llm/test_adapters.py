"""LoRA adapters (made by peft on the tiny phi-2) and phi-msft checkpoints as `--llm`."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from pipeline.llm.answerer import Answerer
from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine

SETTINGS = GenerationSettings(max_new_tokens=16)
QUESTIONS = ["What is a bond?", "How do rising interest rates affect households and companies?"]


def token_ids(answerer: Answerer, engine=None) -> list[list[int]]:
    prompts = [answerer.encode(q, SETTINGS.max_new_tokens) for q in QUESTIONS]
    return [row.token_ids for row in (engine or answerer.engine).generate(prompts, SETTINGS)]


def merged_checkpoint(adapter_dir, base_dir, path):
    """The same adapter merged by peft itself and saved as a full checkpoint."""
    from peft import PeftModel
    from transformers import PhiForCausalLM

    with warnings.catch_warnings():  # peft's own wrapper, the reference, reads a property transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(PhiForCausalLM.from_pretrained(base_dir), str(adapter_dir)).merge_and_unload()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, path / name)
    return path


@pytest.mark.parametrize("adapter", ["tiny_lora_dir", "tiny_lora_saved_head_dir"])
def test_adapter_answers_as_its_merged_full_checkpoint_and_unlike_its_base(adapter, request, tiny_phi2_dir, tmp_path):
    adapter_dir = request.getfixturevalue(adapter)
    served = Answerer.from_pretrained(str(adapter_dir), device="cpu", engine="transformers")
    merged = Answerer.from_pretrained(str(merged_checkpoint(adapter_dir, tiny_phi2_dir, tmp_path / "merged")),
                                      device="cpu", engine="transformers")
    base = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    assert type(served.model).__name__ == "PhiForCausalLM"  # peft's wrappers are gone
    assert token_ids(served) == token_ids(merged)
    assert token_ids(served) != token_ids(base)
    # The fast engine (op by op on the CPU) reads the merged weights too.
    fast = FastPhiEngine(served.model, served.tokenizer.eos_token_id, use_graphs=False, use_triton=False)
    assert token_ids(served, fast) == token_ids(merged)
    assert served.base_name == str(tiny_phi2_dir)


def test_an_adapter_is_built_and_loaded_without_a_warning(tiny_phi2_dir, tmp_path):
    """No FutureWarning (transformers' `is_gradient_checkpointing`, read by peft's PeftModel) at each load."""
    from pipeline.checkpoints import build_lora_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = build_lora_adapter(tmp_path / "lora", tiny_phi2_dir, modules_to_save=["lm_head"])
        Answerer.from_pretrained(str(adapter), device="cpu", engine="transformers")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_swapping_adapters_in_place_keeps_one_copy_of_the_base_and_restores_it_exactly(
        tiny_phi2_dir, tiny_lora_dir, tiny_lora_saved_head_dir):
    from pipeline.llm.models import resolve_llm

    answerer = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    fast = FastPhiEngine(answerer.model, answerer.tokenizer.eos_token_id, use_graphs=False, use_triton=False)
    original = {key: value.clone() for key, value in answerer.model.state_dict().items()}
    storage = {key: value.data_ptr() for key, value in answerer.model.state_dict().items()}
    base_tokens = token_ids(answerer)
    seen = []
    for name in (tiny_lora_dir, tiny_lora_saved_head_dir, tiny_phi2_dir, tiny_lora_dir):
        answerer.switch_to(resolve_llm(str(name)))
        seen.append(token_ids(answerer))
        assert token_ids(answerer, fast) == seen[-1]  # the engine built on the base sees each merge
    answerer.switch_to(resolve_llm(str(tiny_phi2_dir)))
    assert seen[2] == base_tokens == token_ids(answerer)
    assert seen[0] == seen[3] != base_tokens and seen[1] not in (base_tokens, seen[0])
    state = answerer.model.state_dict()
    assert {key: value.data_ptr() for key, value in state.items()} == storage
    assert all(torch.equal(original[key], state[key]) for key in original)


def test_exact_restore_of_float16_weights(tiny_phi2_dir, tiny_lora_dir):
    """W + d - d is not W in float16 for every element: the merge keeps those few and restores them."""
    from pipeline.llm.adapters import apply_adapter, read_adapter

    answerer = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", dtype="float16", engine="transformers")
    original = {key: value.clone() for key, value in answerer.model.state_dict().items()}
    applied = apply_adapter(answerer.model, read_adapter(str(tiny_lora_dir), "lora"))
    assert any(len(item.index) for item in applied.merged)  # the case the restore exists for
    assert not torch.equal(original["model.layers.0.mlp.fc1.weight"], answerer.model.model.layers[0].mlp.fc1.weight)
    applied.remove()
    assert all(torch.equal(original[key], value) for key, value in answerer.model.state_dict().items())


def test_compare_base_and_adapter_loads_the_base_weights_once(qa, tiny_phi2_dir, tiny_lora_dir, monkeypatch):
    from pipeline import BilingualQA
    from pipeline.llm import models

    loads = []
    real_load_base = models.load_base
    monkeypatch.setattr(models, "load_base", lambda *args: loads.append(args[0].directory) or real_load_base(*args))
    compared = BilingualQA(Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers"),
                           qa.ja_en, qa.en_ja)
    model = compared.answerer.model
    results = compared.compare("What is a bond?", [str(tiny_phi2_dir), str(tiny_lora_dir), str(tiny_phi2_dir)],
                               settings=SETTINGS, engine="transformers")
    assert len(loads) == 1 and compared.answerer.model is model
    assert [r.models["llm"] for r in results] == [str(tiny_phi2_dir), str(tiny_lora_dir), str(tiny_phi2_dir)]
    assert results[1].models["llm_base"] == str(tiny_phi2_dir) and "llm_base" not in results[0].models
    assert results[0].answer_en == results[2].answer_en != results[1].answer_en


def test_phi_msft_checkpoint_gives_the_tokens_of_its_converted_form(tiny_phi2_dir, tmp_path):
    from pipeline.checkpoints import build_phi_msft

    legacy_dir = build_phi_msft(tmp_path / "phi-2-msft", tiny_phi2_dir)
    assert json.loads((legacy_dir / "config.json").read_text())["model_type"] == "phi-msft"
    legacy = Answerer.from_pretrained(str(legacy_dir), device="cpu", engine="transformers")
    native = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    assert token_ids(legacy) == token_ids(native)
    fast = FastPhiEngine(legacy.model, legacy.tokenizer.eos_token_id, use_graphs=False, use_triton=False)
    assert token_ids(legacy, fast) == token_ids(native)


def test_adapter_of_a_phi_msft_base_merges_into_the_converted_weights(tiny_phi2_dir, tiny_lora_dir, tmp_path):
    from pipeline.checkpoints import build_phi_msft

    legacy_dir = build_phi_msft(tmp_path / "phi-2-msft", tiny_phi2_dir)
    on_legacy = Answerer.from_pretrained(str(tiny_lora_dir), base=str(legacy_dir), device="cpu", engine="transformers")
    on_native = Answerer.from_pretrained(str(tiny_lora_dir), device="cpu", engine="transformers")
    assert token_ids(on_legacy) == token_ids(on_native)
