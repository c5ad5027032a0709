"""`--llm ADAPTER`, `--base` and `compare` of a base and its adapter, in real subprocesses."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from test_cli import assert_one_line_error, run_cli

QUICK = ["--max-new-tokens", "8", "--beams", "1", "--engine", "transformers", "--mt-backend", "transformers"]


@pytest.fixture
def translators(tiny_ja_en_dir, tiny_en_ja_dir) -> list[str]:
    return ["--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir)]


def test_compare_base_and_adapter_names_both_and_loads_the_base_once(tiny_phi2_dir, tiny_lora_dir, translators):
    args = ["compare", "What is a bond?", "--llm", str(tiny_phi2_dir), "--llm", str(tiny_lora_dir), *translators, *QUICK]
    proc = run_cli(*args, "--format", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    base, adapter = json.loads(proc.stdout)
    assert base["models"]["llm"] == str(tiny_phi2_dir) and "llm_base" not in base["models"]
    assert adapter["models"]["llm"] == str(tiny_lora_dir) and adapter["models"]["llm_base"] == str(tiny_phi2_dir)
    assert base["answer_en"] != adapter["answer_en"]
    assert proc.stderr.decode().count(f"loading {tiny_phi2_dir} ") == 1
    text = run_cli(*args).stdout.decode()
    assert f"=== {tiny_lora_dir} (LoRA adapter on {tiny_phi2_dir}) ===" in text
    assert text.index(f"=== {tiny_phi2_dir} ===") < text.index(f"=== {tiny_lora_dir} (")


def test_compare_of_one_adapter_alone_pairs_it_with_its_base(tiny_phi2_dir, tiny_lora_dir, translators, tmp_path):
    args = ["compare", "What is a bond?", *translators, *QUICK, "--format", "json"]
    alone = run_cli(*args, "--llm", str(tiny_lora_dir))
    both = run_cli(*args, "--llm", str(tiny_phi2_dir), "--llm", str(tiny_lora_dir))
    assert alone.returncode == 0, alone.stderr.decode()
    untimed = [[{k: v for k, v in result.items() if k != "timings"} for result in json.loads(proc.stdout)]
               for proc in (alone, both)]
    assert untimed[0] == untimed[1]  # the base first, as if named
    # --base names the base it is paired with, as it names the one it runs on
    adapter = shutil.copytree(tiny_lora_dir, tmp_path / "adapter")
    _edit_config(adapter, base_model_name_or_path="microsoft/phi-2")  # not in this machine's (empty) cache
    env = {"HF_HOME": str(tmp_path / "hf")}
    proc = run_cli(*args, "--llm", str(adapter), "--base", str(tiny_phi2_dir), env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    base, tuned = json.loads(proc.stdout)
    assert base["models"]["llm"] == str(tiny_phi2_dir) and tuned["models"]["llm_base"] == str(tiny_phi2_dir)


def test_base_option_overrides_the_base_an_adapter_names(tiny_phi2_dir, tiny_lora_dir, translators, tmp_path):
    adapter = shutil.copytree(tiny_lora_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "microsoft/phi-2"  # not in this machine's (empty) cache
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    env = {"HF_HOME": str(tmp_path / "hf")}
    missing = run_cli("ask", "What is a bond?", "--llm", str(adapter), *translators, *QUICK, env=env)
    assert_one_line_error(missing, "microsoft/phi-2", "--base DIR")
    assert "loading" not in missing.stderr.decode()
    proc = run_cli("ask", "What is a bond?", "--llm", str(adapter), "--base", str(tiny_phi2_dir), *translators,
                   *QUICK, "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["models"]["llm_base"] == str(tiny_phi2_dir)


def _edit_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(adapter, edit):
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(edit(tensors), adapter / "adapter_model.safetensors")


def _embedding_of_rows(rows):
    def edit(tensors):
        import torch

        return {**tensors, "base_model.model.model.embed_tokens.weight": torch.zeros(rows, 64)}
    return edit


def _renamed_to_msft(tensors):
    return {key.replace("model.layers.", "transformer.h.").replace("self_attn.q_proj", "mixer.Wqkv"): value
            for key, value in tensors.items()}


def _narrowed_fc1(tensors):
    key = "base_model.model.model.layers.0.mlp.fc1.lora_A.weight"
    return {**tensors, key: tensors[key][:, :32].contiguous()}


BAD_ADAPTERS = {
    "prefix tuning": (lambda a: _edit_config(a, peft_type="PREFIX_TUNING"), ["PREFIX_TUNING", "only LoRA"]),
    "dora": (lambda a: _edit_config(a, use_dora=True), ["use_dora"]),
    "missing base": (lambda a: _edit_config(a, base_model_name_or_path="/nowhere/phi-2"), ["/nowhere/phi-2", "--base"]),
    "other architecture": (lambda a: _edit_tensors(a, _renamed_to_msft), ["transformer.h.0.mixer.Wqkv", "architecture"]),
    "resized embedding": (lambda a: _edit_tensors(a, _embedding_of_rows(576)), ["576 x 64", "640 x 64"]),
    "wrong shape": (lambda a: _edit_tensors(a, _narrowed_fc1), ["fc1.lora_A.weight", "does not fit"]),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_is_one_line_and_exit_2_before_any_weight_loads(case, tiny_lora_dir, translators, tmp_path):
    adapter = shutil.copytree(tiny_lora_dir, tmp_path / "adapter")
    spoil, fragments = BAD_ADAPTERS[case]
    spoil(adapter)
    proc = run_cli("ask", "What is a bond?", "--llm", str(adapter), *translators, *QUICK)
    assert_one_line_error(proc, *fragments)
    assert "loading" not in proc.stderr.decode()
