"""Checkpoints read straight into the fast engines' own modules (pipeline/weights.py, llm/phi_direct.py,
mt/marian_direct.py) hold exactly what transformers' from_pretrained loads, decode to the same ids
through the fast engines (eagerly, on the CPU), and keep the modeling stack out of the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import ModelLoadError
from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.llm.phi_direct import load_direct_phi
from pipeline.mt.fast_marian import FastMarianBackend
from pipeline.mt.marian_direct import lean_reason, load_direct_marian, sinusoidal_table

CPU = torch.device("cpu")


def _marian(directory):
    from transformers import AutoConfig, MarianMTModel

    config = AutoConfig.from_pretrained(directory)
    direct = load_direct_marian(str(directory), "tiny", config, CPU, torch.float32, "fast, float32")
    return direct, MarianMTModel.from_pretrained(directory, dtype=torch.float32).eval()


def _same_state(direct, reference) -> None:
    ours, theirs = direct.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    different = [key for key in theirs if not torch.equal(ours[key], theirs[key])]
    assert different == []


@pytest.mark.parametrize("dim", [32, 33, 512])
def test_marian_position_table_is_transformers_own(dim):
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    reference = MarianSinusoidalPositionalEmbedding(512, dim).create_weight()
    assert torch.equal(sinusoidal_table(512, dim, torch.float32), reference)


def test_direct_marian_holds_what_from_pretrained_loads_and_ties_the_embeddings(tiny_ja_en_dir):
    direct, reference = _marian(tiny_ja_en_dir)
    _same_state(direct, reference)
    shared = direct.model.shared.weight.data_ptr()  # one copy in memory under every tied name
    assert direct.lm_head.weight.data_ptr() == shared == direct.model.decoder.embed_tokens.weight.data_ptr()
    for field in ("num_beams", "forced_eos_token_id", "length_penalty", "max_length", "bad_words_ids"):
        assert getattr(direct.generation_config, field) == getattr(reference.generation_config, field)


def test_direct_marian_translates_as_the_transformers_model_through_the_fast_backend(tiny_ja_en_dir):
    direct, reference = _marian(tiny_ja_en_dir)
    batch = [[5, 17, 33, 2, 0], [40, 41, 0], [9, 8, 7, 6, 5, 4, 3, 0]]
    for beams in (1, 4):
        ours = FastMarianBackend(direct, use_graphs=False).generate(batch, 24, beams)
        assert ours == FastMarianBackend(reference, use_graphs=False).generate(batch, 24, beams)


def test_legacy_bin_marian_with_stored_tables_and_tied_copies_loads_as_transformers_does(tiny_ja_en_dir, tmp_path):
    # The published opus-mt weights are a pytorch_model.bin that stores every tied copy and, in older
    # exports, the position tables (here made different from the computed ones: the stored win).
    folder = tmp_path / "bin-marian"
    folder.mkdir()
    for item in tiny_ja_en_dir.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    state = load_file(str(tiny_ja_en_dir / "model.safetensors"))
    shared = state["model.shared.weight"]
    state.update({"lm_head.weight": shared, "model.encoder.embed_tokens.weight": shared,
                  "model.decoder.embed_tokens.weight": shared})
    config = json.loads((folder / "config.json").read_text())
    table = torch.randn(config["max_position_embeddings"], config["d_model"])
    state["model.encoder.embed_positions.weight"] = table
    torch.save(state, folder / "pytorch_model.bin")
    direct, reference = _marian(folder)
    _same_state(direct, reference)
    assert torch.equal(direct.model.encoder.embed_positions.weight, table)


def test_direct_load_of_weights_that_do_not_fit_the_config_is_one_clear_error(tiny_ja_en_dir, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoConfig

    folder = tmp_path / "short-marian"
    folder.mkdir()
    for item in tiny_ja_en_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    del state["model.decoder.layers.1.fc2.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"do not fit its config.json \(missing \['model.decoder.layers.1.fc2"):
        load_direct_marian(str(folder), "short", AutoConfig.from_pretrained(folder), CPU, torch.float32, "fast")


def test_only_what_the_fast_backend_runs_loads_directly(tiny_ja_en_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_ja_en_dir)
    assert lean_reason(config) is None
    for change, reason in (({"normalize_before": True}, "pre-LN"), ({"tie_word_embeddings": False}, "untied"),
                           ({"activation_function": "gelu_new"}, "gelu_new")):
        assert reason in lean_reason(AutoConfig.from_pretrained(tiny_ja_en_dir, **change))


def _phi_tokens(model, prompts):
    engine = FastPhiEngine(model, 0, use_graphs=False, use_triton=False)
    return [row.token_ids for row in engine.generate(prompts, GenerationSettings(max_new_tokens=24))]


def test_direct_phi_holds_what_from_pretrained_loads_and_decodes_the_same(tiny_phi2_dir):
    from transformers import AutoConfig, PhiForCausalLM

    config = AutoConfig.from_pretrained(tiny_phi2_dir)
    direct = load_direct_phi(str(tiny_phi2_dir), "tiny", config, CPU, torch.float32)
    reference = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    _same_state(direct, reference)
    prompts = [[11, 12, 13, 14], [20, 3]]
    assert _phi_tokens(direct, prompts) == _phi_tokens(reference, prompts)


def test_lean_phi_msft_checkpoint_decodes_as_its_converted_form(tiny_phi2_dir, tmp_path):
    from pipeline.checkpoints import build_phi_msft
    from pipeline.llm.models import load_base, resolve_llm
    from pipeline.llm.phi_direct import DirectPhi

    legacy = resolve_llm(str(build_phi_msft(tmp_path / "phi-2-msft", tiny_phi2_dir)))
    native = resolve_llm(str(tiny_phi2_dir))
    tokenizer = type("T", (), {"eos_token_id": 0})()
    lean = load_base(legacy, CPU, torch.float32, tokenizer, lean=True)
    assert isinstance(lean, DirectPhi)
    prompts = [[5, 6, 7, 8, 9]]
    assert _phi_tokens(lean, prompts) == _phi_tokens(load_base(native, CPU, torch.float32, tokenizer), prompts)


LEAN_PROCESS = """
import sys, torch
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.llm.models import load_llm
from pipeline.mt.fast_marian import FastMarianBackend
from pipeline.mt.marian_direct import load_direct_marian
from pipeline.loading import load_tokenizer
from pipeline.model_files import read_config
phi, marian = sys.argv[1], sys.argv[2]
loaded = load_llm(phi, device=torch.device("cpu"), dtype=torch.float32, lean=True)
engine = FastPhiEngine(loaded.model, 0, use_graphs=False, use_triton=False)
model = load_direct_marian(marian, "m", read_config(marian), torch.device("cpu"), torch.float32, "fast")
tokenizer = load_tokenizer(marian, "m", lean=True)
FastMarianBackend(model, use_graphs=False).generate([tokenizer("こんにちは")["input_ids"]], 8, 2)
heavy = ("transformers", "sacremoses", "sympy", "sklearn", "torch.distributed.tensor", "torch._dynamo", "transformers.modeling_utils",
         "transformers.activations", "transformers.models.phi.modeling_phi", "transformers.models.marian.modeling_marian")
print(type(loaded.model).__name__, " ".join(sorted(m for m in sys.modules if m in heavy)))
"""


def test_lean_models_and_fast_engines_import_no_modeling_stack_nor_transformers(tiny_phi2_dir, tiny_ja_en_dir):
    proc = subprocess.run([sys.executable, "-c", LEAN_PROCESS, str(tiny_phi2_dir), str(tiny_ja_en_dir)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["DirectPhi"]  # the model's class, then no heavy module at all


@pytest.mark.parametrize("fixture", ["tiny_ja_en_dir", "tiny_phi2_dir"])
def test_a_config_read_without_transformers_loads_the_same_lean_model(fixture, request):
    from transformers import AutoConfig

    from pipeline.model_files import read_config

    directory = str(request.getfixturevalue(fixture))
    load = load_direct_marian if fixture == "tiny_ja_en_dir" else load_direct_phi
    args = ("fast, float32",) if load is load_direct_marian else ()
    lean = load(directory, "tiny", read_config(directory), CPU, torch.float32, *args)
    full = load(directory, "tiny", AutoConfig.from_pretrained(directory), CPU, torch.float32, *args)
    _same_state(lean, full)
    for field in ("num_beams", "forced_eos_token_id", "length_penalty", "max_length", "bad_words_ids"):
        assert getattr(lean.generation_config, field) == getattr(full.generation_config, field)


def test_weights_read_in_the_background_are_the_checkpoints_and_its_errors_come_with_them(tiny_phi2_dir, tmp_path):
    from pipeline.weights import read_in_background, read_weights

    ahead = read_in_background(str(tiny_phi2_dir), CPU, torch.float32, "tiny").result(timeout=60)
    now = read_weights(str(tiny_phi2_dir), CPU, torch.float32)
    assert set(ahead) == set(now) and all(torch.equal(ahead[key], now[key]) for key in now)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="cannot load model 'damaged'"):
        read_in_background(str(damaged), CPU, None, "damaged").result(timeout=60)


def test_a_pipeline_given_a_loader_for_its_answerer_loads_it_when_the_answer_stage_needs_it(
        tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    from pipeline.llm.answerer import Answerer
    from pipeline.mt.translator import Translator
    from pipeline.qa import BilingualQA
    from pipeline.spec import LoadSpec

    calls = []

    def load():
        calls.append(len(calls))
        return Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu")

    translators = [Translator.from_pretrained(str(path), device="cpu", target_lang=lang)
                   for path, lang in ((tiny_ja_en_dir, "en"), (tiny_en_ja_dir, "ja"))]
    qa = BilingualQA(load, *translators, spec=LoadSpec.resolve(str(tiny_phi2_dir), str(tiny_ja_en_dir), str(tiny_en_ja_dir)))
    assert calls == []
    settings = GenerationSettings(max_new_tokens=8)
    first, second = qa.ask("複利とは何ですか？", settings=settings), qa.ask("What is a bond?", settings=settings)
    assert calls == [0] and first.answer_en is not None and second.models["llm"] == str(tiny_phi2_dir)


def test_a_graph_capture_waits_for_the_weights_read_in_the_background(tiny_phi2_dir, monkeypatch):
    # Copies (allocations, pageable transfers) on another thread break a CUDA graph capture: the read
    # holds the GPU gate's work side, so a capture starts only once the read is over.
    import time

    import pipeline.weights as weights
    from pipeline.gpu_gate import GATE

    placed = weights._placed

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return placed(*args, **kwargs)

    monkeypatch.setattr(weights, "_placed", slow)
    reading = weights.read_in_background(str(tiny_phi2_dir), CPU, torch.float32, "tiny")
    time.sleep(0.05)  # the read is under way (33 tensors, 20 ms each)
    assert not reading.done()
    with GATE.capture():
        assert reading.done()
