"""The one sampler (llm/sampler.py): greedy is the argmax; a sampling row's draw follows its softmax
and top-p, and depends on its own logits, seed and step alone; every decode path of both engines draws
the same tokens for a seeded request."""

from __future__ import annotations

import pytest
import torch

from pipeline.llm.continuous import open_decode_batch
from pipeline.llm.sampler import SamplingRows, choose, gumbel_noise
from pipeline.spec import GenerationSettings

SAMPLED = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=77)


def rows_of(settings: list[GenerationSettings], seeds: list[int], steps: list[int]) -> SamplingRows:
    return SamplingRows.of(settings, seeds, steps, "cpu")


def test_greedy_rows_take_the_argmax_beside_sampling_rows():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    settings = [GenerationSettings(), SAMPLED, GenerationSettings(), SAMPLED]
    tokens, values = choose(logits, rows_of(settings, [0, 5, 0, 6], [0, 3, 0, 3]))
    assert tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()
    assert torch.equal(values, logits.max(-1).values)
    assert torch.equal(choose(logits)[0], logits.argmax(-1))


def test_a_rows_draw_depends_on_its_own_logits_seed_and_step_not_on_its_batch():
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(1, 300, generator=gen)
    alone, _ = choose(row, rows_of([SAMPLED], [9], [4]))
    for size, place in ((3, 0), (7, 5), (64, 63)):
        batch = torch.randn(size, 300, generator=gen)
        batch[place] = row[0]
        seeds, steps = list(range(100, 100 + size)), [0] * size
        seeds[place], steps[place] = 9, 4
        tokens, _ = choose(batch, rows_of([SAMPLED] * size, seeds, steps))
        assert tokens[place] == alone[0]


def test_draws_follow_the_softmax_at_the_temperature_and_keep_to_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = 20_000
    wide = GenerationSettings(temperature=0.7)
    rows = rows_of([wide] * draws, list(range(draws)), [0] * draws)
    tokens, _ = choose(logits.expand(draws, -1), rows)
    seen = torch.bincount(tokens, minlength=6).float() / draws
    expected = (logits[0] / 0.7).softmax(-1)
    assert (seen - expected).abs().max() < 0.015, (seen, expected)
    for top_p, nucleus in ((0.8, {0, 1}), (0.9, {0, 1, 2})):  # probabilities 0.70, 0.17, 0.08, ...
        narrow = GenerationSettings(temperature=0.7, top_p=top_p)
        tokens, _ = choose(logits.expand(draws, -1), rows_of([narrow] * draws, list(range(draws)), [0] * draws))
        assert set(tokens.tolist()) == nucleus


def test_the_noise_changes_with_the_seed_and_the_step_and_nothing_else():
    one = gumbel_noise(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 1000)
    again = gumbel_noise(torch.tensor([5]), torch.tensor([0]), 1000)
    assert torch.equal(one[0], again[0])
    assert not torch.equal(one[0], one[1]) and not torch.equal(one[0], one[2])
    assert torch.isfinite(one).all()
    uniform = torch.exp(-torch.exp(-one.flatten()))  # back to (0, 1): about evenly spread
    assert abs(uniform.mean().item() - 0.5) < 0.02


@pytest.fixture(scope="module")
def engines(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    from pipeline.llm.engine import TransformersEngine
    from pipeline.llm.fast_engine import FastPhiEngine

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    return {"fast": FastPhiEngine(model, eos, use_graphs=False, max_seq_len=256), "transformers": TransformersEngine(model, eos)}


def batch_tokens(engine, prompts: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
    """The prompts through the engine's continuous batch, together, each to its length or end-of-text."""
    batch = open_decode_batch(engine, 8, "continuous")
    out = {}
    for index, (key, first) in enumerate(batch.add([(p, settings) for p in prompts])):
        out[key] = (index, [first])
    while any(len(ids) < settings.max_new_tokens and engine.eos_token_id not in ids for _, ids in out.values()):
        for key, token in batch.step().items():
            out[key][1].append(token)
    for key in out:
        batch.drop(key)
    ids = [out[key][1] for key in sorted(out, key=lambda k: out[k][0])]
    return [row[:row.index(engine.eos_token_id)] if engine.eos_token_id in row else row[:settings.max_new_tokens]
            for row in ids]


@pytest.mark.parametrize("kind", ["fast", "transformers"])
def test_a_seeded_answer_is_the_same_from_generate_stream_and_the_continuous_batch(engines, kind):
    engine = engines[kind]
    prompts = [[5, 17, 99, 3], [300, 12, 12, 450, 8], [42]]
    alone = [engine.generate([p], SAMPLED)[0].token_ids for p in prompts]
    assert [g.token_ids for g in engine.generate(prompts, SAMPLED)] == alone  # ask --batch, micro-batching
    assert [list(engine.stream(p, SAMPLED)) for p in prompts] == alone  # ask --stream
    assert batch_tokens(engine, prompts, SAMPLED) == alone  # serve's continuous batch
    greedy = [engine.generate([p], GenerationSettings(max_new_tokens=12))[0].token_ids for p in prompts]
    assert alone != greedy


def test_both_engines_draw_the_same_seeded_tokens_from_the_same_logits(engines):
    """On the CPU in float32 the two engines' logits agree to rounding, so one sampler draws alike."""
    prompts = [[5, 17, 99, 3], [300, 12, 12, 450, 8]]
    fast = [g.token_ids for g in engines["fast"].generate(prompts, SAMPLED)]
    assert fast == [g.token_ids for g in engines["transformers"].generate(prompts, SAMPLED)]
