"""A base and its LoRA adapters on one copy of the weights, each row applying its own adapter unmerged
(llm/multi_lora.py): every row's greedy tokens equal those of its adapter merged and run alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.llm.answerer import Answerer
from pipeline.llm.decode_config import DEFAULT_DECODE
from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.llm.models import resolve_llm

SETTINGS = GenerationSettings(max_new_tokens=12)
QUESTIONS = ["What is a bond?", "How do rising interest rates affect households and companies?", "Why?"]


def alone(directory, questions) -> list[list[int]]:
    """Each question's tokens from the model merged and run by itself (what `ask --llm` does)."""
    answerer = Answerer.from_pretrained(str(directory), device="cpu", engine="transformers")
    return [answerer.engine.generate([answerer.encode(q, SETTINGS.max_new_tokens)], SETTINGS)[0].token_ids
            for q in questions]


@pytest.fixture(scope="module")
def expected(tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir):
    return {index: alone(directory, QUESTIONS)
            for index, directory in enumerate((tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir))}


def family(tiny_phi2_dir, adapters, engine: str):
    base = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    if engine == "fast":
        base.engine = FastPhiEngine(base.model, base.engine.eos_token_id, use_graphs=False, use_triton=False)
    return [base] + [base.attach(resolve_llm(str(directory))) for directory in adapters]


def mixed_rows():
    """Every (model, question) pair, interleaved so each batch holds rows of all three models."""
    return [(model, question) for question in range(len(QUESTIONS)) for model in (0, 1, 2)]


@pytest.mark.parametrize("engine,fused_layer", [("fast", True), ("fast", False), ("transformers", None)])
def test_a_batch_of_base_and_two_adapters_answers_each_row_as_its_model_alone(
        tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir, expected, engine, fused_layer):
    models = family(tiny_phi2_dir, (tiny_lora_dir, tiny_lora_second_dir), engine)
    if fused_layer is not None:  # the fused two-product layer (LoRA batches' default), or the four products
        models[0].engine.config = dataclasses.replace(models[0].engine.config, lora_fused_layer=fused_layer)
    assert all(m.engine is models[0].engine and m.model is models[0].model for m in models)
    rows = mixed_rows()
    prompts = [models[m].encode(QUESTIONS[q], SETTINGS.max_new_tokens) for m, q in rows]
    out = models[0].engine.generate(prompts, SETTINGS, adapters=[models[m].adapter for m, _ in rows])
    assert [r.token_ids for r in out] == [expected[m][q] for m, q in rows]
    assert expected[0] != expected[1] and expected[0] != expected[2] and expected[1] != expected[2]
    # Each answerer alone (its own generate call) still applies its own adapter.
    assert [r.token_ids for r in models[2].engine.generate(prompts[2:3], SETTINGS, adapters=[2])] == [expected[2][0]]
    answers = models[1].answer(QUESTIONS[:1], SETTINGS)
    assert answers[0].generated_tokens <= len(expected[1][0])


@pytest.mark.parametrize("engine", ["fast", "transformers"])
def test_rows_of_three_models_join_and_leave_one_continuous_batch(
        tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir, expected, engine):
    from pipeline.llm.continuous import open_decode_batch

    models = family(tiny_phi2_dir, (tiny_lora_dir, tiny_lora_second_dir), engine)
    batch = open_decode_batch(models[0].engine, 16, "continuous")
    rows = mixed_rows()
    tokens: dict[int, list[int]] = {}
    owner: dict[int, tuple[int, int]] = {}
    waiting = list(rows)
    widest = 0
    while waiting or batch:
        if waiting:  # one new row per step: rows join a batch already decoding
            m, q = waiting.pop(0)
            (key, first), = batch.add([(models[m].encode(QUESTIONS[q], SETTINGS.max_new_tokens), SETTINGS,
                                        models[m].adapter)])
            tokens[key], owner[key] = [first], (m, q)
        widest = max(widest, len({owner[key][0] for key in tokens if len(tokens[key]) < SETTINGS.max_new_tokens}))
        for key, token in batch.step().items():
            tokens[key].append(token)
        for key in [k for k in list(tokens) if len(tokens[k]) >= SETTINGS.max_new_tokens and k in owner]:
            batch.drop(key)
            m, q = owner.pop(key)
            tokens[(m, q)] = tokens.pop(key)[:SETTINGS.max_new_tokens]
    eos = models[0].engine.eos_token_id
    for m, q in rows:
        row = tokens[(m, q)]
        row = row[:row.index(eos)] if eos in row else row
        assert row == expected[m][q], (m, q)
    assert widest == 3


def test_groups_of_base_and_adapter_rows_join_a_running_fast_batch_each_as_its_model_alone(
        tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir, expected, monkeypatch):
    """Prompts that arrive together join in one left-padded prefill (fast_batch.py's grouped join),
    rows of the base and both adapters mixed in it, while other rows decode; each row applies its own
    adapter in that prefill and in every later step (the index the join writes to the row's slot)."""
    from pipeline.llm.continuous import open_decode_batch

    models = family(tiny_phi2_dir, (tiny_lora_dir, tiny_lora_second_dir), "fast")
    batch = open_decode_batch(models[0].engine, 16, "continuous")
    prefilled = []  # the adapters of each prefill group
    prefill = batch._prefill_rows

    def recording(rows):
        prefilled.append(sorted(row.adapter for row in rows))
        return prefill(rows)

    monkeypatch.setattr(batch, "_prefill_rows", recording)
    # (model, question) pairs by the step before which they join: every pair once
    schedule = {0: [(0, 1)], 2: [(1, 0), (2, 1), (0, 2), (1, 2)], 5: [(2, 0), (0, 0), (1, 1), (2, 2)]}
    tokens: dict[tuple[int, int], list[int]] = {}
    live: dict[int, tuple[int, int]] = {}
    for step in range(10 * SETTINGS.max_new_tokens):
        if step in schedule:
            assert step == 0 or live  # the group joins a batch that is decoding
            added = batch.add([(models[m].encode(QUESTIONS[q], SETTINGS.max_new_tokens), SETTINGS,
                                models[m].adapter) for m, q in schedule[step]])
            for (key, first), pair in zip(added, schedule[step]):
                tokens[pair], live[key] = [first], pair
        for key in [key for key, pair in live.items() if len(tokens[pair]) >= SETTINGS.max_new_tokens]:
            batch.drop(key)
            del live[key]
        if not live and step > max(schedule):
            break
        for key, token in batch.step().items():
            tokens[live[key]].append(token)
    assert prefilled == [[0], [0, 1, 1, 2], [0, 1, 2, 2]]  # one prefill per group, the adapters mixed in it
    eos = models[0].engine.eos_token_id
    assert sorted(tokens) == sorted(pair for group in schedule.values() for pair in group)
    for (m, q), row in tokens.items():
        row = row[:SETTINGS.max_new_tokens]
        assert (row[:row.index(eos)] if eos in row else row) == expected[m][q], (m, q)
    assert len(batch) == 0 and not models[0].engine.cache.busy


def test_the_base_weights_are_held_once_and_untouched(tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir):
    base = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    engine = FastPhiEngine(base.model, base.engine.eos_token_id, use_graphs=False, use_triton=False)
    base.engine = engine
    before = {key: value.clone() for key, value in base.model.state_dict().items()}
    storage = {key: value.data_ptr() for key, value in base.model.state_dict().items()}
    for directory in (tiny_lora_dir, tiny_lora_second_dir):
        base.attach(resolve_llm(str(directory)))
    state = base.model.state_dict()
    assert type(base.model).__name__ == "PhiForCausalLM" and set(state) == set(before)  # no peft wrappers left
    assert {key: value.data_ptr() for key, value in state.items()} == storage
    assert all(torch.equal(before[key], state[key]) for key in before)
    base_bytes = sum(p.nbytes for p in base.model.parameters())
    assert engine.weights.lora.nbytes < 0.5 * base_bytes  # the factors, a fraction of the base


def test_an_adapter_that_replaces_whole_tensors_cannot_share_and_says_why(tiny_phi2_dir, tiny_lora_saved_head_dir):
    from pipeline.llm.adapters import AdapterError

    base = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    base.engine = FastPhiEngine(base.model, base.engine.eos_token_id, use_graphs=False, use_triton=False)
    with pytest.raises(AdapterError, match="replaces whole tensors"):
        base.attach(resolve_llm(str(tiny_lora_saved_head_dir)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton kernels need a GPU")
@pytest.mark.parametrize("fused_layer,beside", [(True, False), (False, False), (True, True)])
def test_on_the_gpu_with_graphs_each_row_answers_as_its_model_alone(
        tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir, fused_layer, beside):
    """The captured decode step (the fused layer with the LoRA products on their own stream, the
    skinny products below 17 rows, the MLP beside attention) and the Triton prefill, in float32,
    against each model merged on the GPU."""
    from pipeline.llm.continuous import open_decode_batch

    directories = (tiny_phi2_dir, tiny_lora_dir, tiny_lora_second_dir)
    want = {}
    for index, directory in enumerate(directories):
        merged = Answerer.from_pretrained(str(directory), device="cuda", dtype="float32", engine="transformers")
        want[index] = [merged.engine.generate([merged.encode(q, SETTINGS.max_new_tokens)], SETTINGS)[0].token_ids
                       for q in QUESTIONS]
    base = Answerer.from_pretrained(str(tiny_phi2_dir), device="cuda", dtype="float32", engine="fast")
    base.engine.config = dataclasses.replace(base.engine.config, lora_fused_layer=fused_layer,
                                             fused_min_rows=1 if beside else DEFAULT_DECODE.fused_min_rows,
                                             lora_mlp_beside=beside)
    models = [base] + [base.attach(resolve_llm(str(d))) for d in directories[1:]]
    assert base.engine.use_graphs and base.engine.name == "fast"
    rows = mixed_rows()
    prompts = [models[m].encode(QUESTIONS[q], SETTINGS.max_new_tokens) for m, q in rows]
    out = base.engine.generate(prompts, SETTINGS, adapters=[models[m].adapter for m, _ in rows])
    assert [r.token_ids for r in out] == [want[m][q] for m, q in rows]
    batch = open_decode_batch(base.engine, 16, "continuous")  # every row joins one running batch
    added = batch.add([(prompt, SETTINGS, models[m].adapter) for prompt, (m, q) in zip(prompts, rows)])
    keys = {key: (m, q) for (key, _), (m, q) in zip(added, rows)}
    tokens = {key: [] for key in keys}
    for _ in range(4 * SETTINGS.max_new_tokens):  # a greedy step's tokens may come with the next step's
        if all(len(row) >= SETTINGS.max_new_tokens - 1 for row in tokens.values()):
            break
        for key, token in batch.step().items():
            tokens[key].append(token)
    eos = base.engine.eos_token_id
    for key, (m, q) in keys.items():
        row = tokens[key][:SETTINGS.max_new_tokens - 1]
        assert (row[:row.index(eos)] if eos in row else row) == want[m][q][1:], (m, q)
