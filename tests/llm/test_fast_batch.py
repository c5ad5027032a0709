"""Continuous batching on FastPhiEngine (llm/fast_batch.py): rows join and leave a running batch and
each decodes what it decodes alone (CPU, fp32, the engine's decode path without graphs)."""

from __future__ import annotations

import pytest
import torch

from pipeline.llm.engine import GenerationSettings
from pipeline.llm.fast_batch import FastDecodeBatch
from pipeline.llm.fast_engine import FastPhiEngine

TOKENS = 20
GREEDY = GenerationSettings(max_new_tokens=TOKENS)
SHORT, MEDIUM, LONG = [5, 17, 99, 3], [300, 12, 12, 450, 8, 1, 77], list(range(100, 130))


@pytest.fixture(scope="module")
def engine(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    return FastPhiEngine(model, model.config.eos_token_id, use_graphs=False, max_seq_len=256)


def alone(engine, prompt):
    return engine.generate([prompt], GREEDY)[0].token_ids


def run(batch, schedule: dict[int, list[list[int]]], steps: int, eos: int) -> list[list[int]]:
    """Add schedule[step]'s prompts before that step; a row leaves at end-of-text or TOKENS tokens."""
    outputs, live = [], {}
    for step in range(steps):
        for prompt in schedule.get(step, []):
            key, first = batch.add(prompt, GREEDY)
            outputs.append([first])
            live[key] = len(outputs) - 1
        for key, index in list(live.items()):  # rows done before this step leave now
            if outputs[index][-1] == eos or len(outputs[index]) >= TOKENS:
                batch.drop(key)
                del live[key]
        for key, token in batch.step().items():
            outputs[live[key]].append(token)
    return [[t for t in out[:TOKENS]][:out.index(eos) if eos in out else TOKENS] for out in outputs]


def test_rows_joining_a_running_batch_decode_what_they_decode_alone(engine):
    prompts = [SHORT, MEDIUM, LONG, SHORT]
    want = [alone(engine, p) for p in prompts]
    eos = engine.eos_token_id
    batch = FastDecodeBatch(engine, max_rows=4)
    moves, move = [], batch._move
    batch._move = lambda first, end, by: (moves.append((first, end, by)), move(first, end, by))
    got = run(batch, {0: [SHORT], 3: [MEDIUM], 5: [LONG], 9: [SHORT]}, steps=60, eos=eos)
    assert got == want
    # LONG (30 tokens) joined when 9 columns were in use: the live columns moved right for it
    assert (0, 9, 21) in moves
    assert len(batch) == 0 and not engine._busy


def test_the_columns_move_left_when_the_shared_column_reaches_the_cache_end(engine):
    prompts = [MEDIUM, SHORT, MEDIUM, SHORT, MEDIUM]
    want = [alone(engine, p) for p in prompts]
    batch = FastDecodeBatch(engine, max_rows=2, columns=48)  # rows keep coming: col passes 48
    moves, move = [], batch._move
    batch._move = lambda first, end, by: (moves.append(by), move(first, end, by))
    got = run(batch, {0: [MEDIUM], 8: [SHORT], 26: [MEDIUM], 40: [SHORT], 55: [MEDIUM]}, steps=90,
              eos=engine.eos_token_id)
    assert got == want
    assert any(by < 0 for by in moves)  # the live columns did move left


def test_a_free_row_is_reused_and_the_engine_is_free_again_when_the_batch_empties(engine):
    batch = FastDecodeBatch(engine, max_rows=2)
    first, _ = batch.add(SHORT, GREEDY)
    with pytest.raises(RuntimeError, match="one generate"):
        engine.generate([SHORT], GREEDY)
    second, _ = batch.add(MEDIUM, GREEDY)
    with pytest.raises(RuntimeError, match="full"):
        batch.add(SHORT, GREEDY)
    batch.drop(first)
    third, _ = batch.add(LONG, GREEDY)
    assert batch.rows[third].row == 0  # the lowest free row
    for key in (second, third):
        batch.drop(key)
    assert engine.generate([SHORT], GREEDY)[0].token_ids == alone(engine, SHORT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_the_gpu_the_captured_graphs_decode_what_each_row_decodes_alone(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval().to("cuda")
    engine = FastPhiEngine(model, model.config.eos_token_id, max_seq_len=256)
    prompts = [SHORT, MEDIUM, LONG, SHORT]
    want = [alone(engine, p) for p in prompts]
    batch = FastDecodeBatch(engine, max_rows=4, columns=64)
    got = run(batch, {0: [SHORT], 3: [MEDIUM], 5: [LONG], 30: [SHORT]}, steps=80, eos=engine.eos_token_id)
    assert got == want


def test_the_server_batches_the_fast_engine_continuously_only_when_asked(engine):
    from pipeline.llm.continuous import open_decode_batch

    assert open_decode_batch(engine, 4) is None  # auto: micro-batching, measured on the GPU
    assert open_decode_batch(engine, 4, "micro") is None
    assert isinstance(open_decode_batch(engine, 4, "continuous"), FastDecodeBatch)
