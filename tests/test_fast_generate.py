"""FastPhiEngine against transformers on the same tiny phi-2 checkpoint (CPU, fp32, no graphs).

The decode path checked here is the one the GPU captures in graphs, op for op; only the attention over
the cache differs there (a Triton kernel), and benchmarks/llm_decode.py checks that path on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.fast_generate import FastPhiEngine
from pipeline.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenerationSettings, TransformersEngine

PROMPTS = [[5, 17, 99, 3], [42] * 11, list(range(100, 140)), [7], [300, 12, 12, 450, 8, 1, 77]]
GREEDY = GenerationSettings(max_new_tokens=24)


@pytest.fixture(scope="module")
def phi2_dir(request, tmp_path_factory):
    try:  # the shared session checkpoint, once tests/conftest.py provides it
        return request.getfixturevalue("tiny_phi2_dir")
    except pytest.FixtureLookupError:
        from tiny_models import build_tiny_phi2

        return build_tiny_phi2(tmp_path_factory.mktemp("tiny_phi2"))


@pytest.fixture(scope="module")
def model(phi2_dir):
    from transformers import PhiForCausalLM

    return PhiForCausalLM.from_pretrained(phi2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eos(model):
    return model.config.eos_token_id


@pytest.fixture(scope="module")
def fast(model, eos):
    return FastPhiEngine(model, eos, use_graphs=False, max_seq_len=256)


@pytest.fixture(scope="module")
def reference(model, eos):
    return TransformersEngine(model, eos)


def test_greedy_tokens_match_transformers_generate_prompt_by_prompt(fast, reference):
    for prompt in PROMPTS:
        ours = fast.generate([prompt], GREEDY)[0]
        theirs = reference.generate([prompt], GREEDY)[0]
        assert ours.token_ids == theirs.token_ids
        assert ours.finish_reason == theirs.finish_reason


def test_greedy_mixed_length_batch_matches_transformers_batch(fast, reference):
    ours = fast.generate(PROMPTS, GREEDY)
    theirs = reference.generate(PROMPTS, GREEDY)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]


def test_each_row_of_a_mixed_length_batch_matches_running_it_alone(fast):
    batch = fast.generate(PROMPTS, GREEDY)
    alone = [fast.generate([prompt], GREEDY)[0] for prompt in PROMPTS]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batch}) > 1  # the rows really differ


def test_batches_larger_than_max_batch_size_run_in_groups(model, eos, fast):
    small = FastPhiEngine(model, eos, use_graphs=False, max_batch_size=2, max_seq_len=256)
    assert [g.token_ids for g in small.generate(PROMPTS, GREEDY)] == \
        [g.token_ids for g in fast.generate(PROMPTS, GREEDY)]


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(fast):
    def sample(seed):
        settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=seed)
        return [g.token_ids for g in fast.generate(PROMPTS[:3], settings)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != [g.token_ids for g in fast.generate(PROMPTS[:3], GREEDY)]


def test_top_p_near_zero_samples_the_greedy_token(fast):
    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=3)
    assert [g.token_ids for g in fast.generate(PROMPTS, settings)] == \
        [g.token_ids for g in fast.generate(PROMPTS, GREEDY)]


def test_stop_check_finishes_the_row_with_reason_stop(model, eos, fast):
    greedy = fast.generate([PROMPTS[0], PROMPTS[2]], GREEDY)
    marker = greedy[0].token_ids[5]
    checked = []

    def stop_check(ids):
        checked.append(len(ids))
        return marker in ids

    engine = FastPhiEngine(model, eos, use_graphs=False, max_seq_len=256, check_every=4)
    out = engine.generate([PROMPTS[0], PROMPTS[2]], GREEDY, stop_check)
    assert out[0].finish_reason == FINISH_STOP
    assert marker in out[0].token_ids
    assert out[0].token_ids == greedy[0].token_ids[:len(out[0].token_ids)]
    assert len(out[0].token_ids) <= 8  # cut at the first check after the marker (every 4 steps)
    if marker not in greedy[1].token_ids:
        assert out[1].finish_reason == FINISH_LENGTH
    assert max(checked) <= GREEDY.max_new_tokens
    assert all(length % 4 == 0 for length in checked[:4])  # checked in chunks, not per token


def test_end_of_text_ends_the_row_like_transformers(model, fast):
    greedy = fast.generate([PROMPTS[1], PROMPTS[4]], GREEDY)
    pretend_eos = greedy[1].token_ids[6]  # any id can be end-of-text; this one appears mid-answer
    ours = FastPhiEngine(model, pretend_eos, use_graphs=False, max_seq_len=256)
    theirs = TransformersEngine(model, pretend_eos)
    batch = [PROMPTS[1], PROMPTS[4]]
    got, want = ours.generate(batch, GREEDY), theirs.generate(batch, GREEDY)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert got[1].finish_reason == FINISH_EOS
    assert pretend_eos not in got[1].token_ids
    assert len(got[1].token_ids) <= 6


def test_stream_yields_the_same_tokens_as_generate(model, fast):
    for prompt in PROMPTS[:3]:
        assert list(fast.stream(prompt, GREEDY)) == fast.generate([prompt], GREEDY)[0].token_ids
    pretend_eos = fast.generate([PROMPTS[2]], GREEDY)[0].token_ids[4]
    engine = FastPhiEngine(model, pretend_eos, use_graphs=False, max_seq_len=256)
    streamed = list(engine.stream(PROMPTS[2], GREEDY))
    assert streamed == engine.generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert pretend_eos not in streamed


def test_generation_stops_at_the_cache_length(model, eos):
    engine = FastPhiEngine(model, eos, use_graphs=False, max_seq_len=32)
    out = engine.generate([list(range(10, 30))], GenerationSettings(max_new_tokens=50))[0]
    assert len(out.token_ids) <= 12
    with pytest.raises(InputTooLongError):
        engine.generate([list(range(10, 50))], GREEDY)


def test_unsupported_reason_names_non_phi_models_and_plain_cpu(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    assert "gpt2" in FastPhiEngine.unsupported_reason(gpt2, "cpu", use_graphs=False)
    assert FastPhiEngine.unsupported_reason(model, "cpu") is not None  # graphs need CUDA
    assert FastPhiEngine.unsupported_reason(model, "cpu", use_graphs=False) is None
    with pytest.raises(ModelLoadError):
        FastPhiEngine(gpt2, 0, use_graphs=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_same_tokens_as_the_eager_step(phi2_dir):
    from transformers import PhiForCausalLM

    gpu = PhiForCausalLM.from_pretrained(phi2_dir, dtype=torch.float32).eval().cuda()
    eos = gpu.config.eos_token_id
    graphs = FastPhiEngine(gpu, eos, max_batch_size=8)
    eager = FastPhiEngine(gpu, eos, use_graphs=False, use_triton=False)
    reference = TransformersEngine(gpu, eos)
    got = [g.token_ids for g in graphs.generate(PROMPTS, GREEDY)]
    assert got == [g.token_ids for g in eager.generate(PROMPTS, GREEDY)]
    assert got == [g.token_ids for g in reference.generate(PROMPTS, GREEDY)]
    assert list(graphs.stream(PROMPTS[2], GREEDY)) == got[2]
