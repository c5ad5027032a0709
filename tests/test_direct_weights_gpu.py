"""On the GPU, with CUDA graphs and the Triton kernels: the fast engines decode the same ids from the
weights read straight into their own modules as from transformers' models, and a lean pipeline
(`BilingualQA.from_pretrained(lean=True)`, what `bilingual-qa ask` loads) answers as the full one.
Skipped without CUDA; tests/test_direct_weights.py checks the same eagerly on the CPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def test_fast_backend_translates_the_same_from_direct_and_transformers_weights(tiny_ja_en_dir):
    from transformers import AutoConfig, MarianMTModel

    from pipeline.mt.fast_marian import FastMarianBackend
    from pipeline.mt.marian_direct import load_direct_marian

    direct = load_direct_marian(str(tiny_ja_en_dir), "tiny", AutoConfig.from_pretrained(tiny_ja_en_dir),
                                CUDA, torch.bfloat16, "fast")
    reference = MarianMTModel.from_pretrained(tiny_ja_en_dir, dtype=torch.bfloat16, device_map={"": CUDA}).eval()
    batch = [[5, 17, 33, 2, 0], [40, 41, 0], [9, 8, 7, 6, 5, 4, 3, 0]]
    ours, theirs = FastMarianBackend(direct), FastMarianBackend(reference)
    assert ours.use_graphs
    for beams in (1, 4, 1, 4):  # the second of each shape replays captured graphs
        assert ours.generate(batch, 24, beams) == theirs.generate(batch, 24, beams)


def test_fast_engine_decodes_the_same_from_direct_and_transformers_weights(tiny_phi2_dir):
    from transformers import AutoConfig, PhiForCausalLM

    from pipeline.spec import GenerationSettings
    from pipeline.llm.fast_engine import FastPhiEngine
    from pipeline.llm.phi_direct import load_direct_phi

    direct = load_direct_phi(str(tiny_phi2_dir), "tiny", AutoConfig.from_pretrained(tiny_phi2_dir), CUDA, torch.bfloat16)
    reference = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.bfloat16, device_map={"": CUDA}).eval()
    prompts, settings = [[11, 12, 13, 14], [20, 3]], GenerationSettings(max_new_tokens=32)
    ours, theirs = FastPhiEngine(direct, 0), FastPhiEngine(reference, 0)
    assert ours.use_graphs
    assert [r.token_ids for r in ours.generate(prompts, settings)] == [r.token_ids for r in theirs.generate(prompts, settings)]


def test_lean_pipeline_answers_as_the_full_one(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    from pipeline.spec import GenerationSettings
    from pipeline.llm.phi_direct import DirectPhi
    from pipeline.mt.marian_direct import DirectMarian
    from pipeline.qa import BilingualQA

    names = (str(tiny_phi2_dir), str(tiny_ja_en_dir), str(tiny_en_ja_dir))
    settings = GenerationSettings(max_new_tokens=24)
    lean = BilingualQA.from_pretrained(*names, lean=True)
    assert isinstance(lean.answerer.model, DirectPhi) and isinstance(lean.ja_en.model, DirectMarian)
    ours = [lean.ask(q, settings=settings).to_dict() for q in ("複利とは何ですか？", "What is a bond?")]
    del lean
    full = BilingualQA.from_pretrained(*names)
    assert not isinstance(full.answerer.model, DirectPhi)
    theirs = [full.ask(q, settings=settings).to_dict() for q in ("複利とは何ですか？", "What is a bond?")]
    for mine, other in zip(ours, theirs):
        mine.pop("timings", None), other.pop("timings", None)
        assert mine == other
