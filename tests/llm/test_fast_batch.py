"""Continuous batching on FastPhiEngine (llm/fast_batch.py): rows of any length join and leave a
running batch, each holding the cache blocks its tokens fill, and each decodes what it decodes alone,
also when the blocks run short and rows are preempted and resumed (CPU, fp32, the engine's decode path
without graphs; tests/llm/test_fast_batch_gpu.py runs the same on the GPU with graphs at phi-2's
published shape)."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.errors import InputTooLongError
from pipeline.spec import GenerationSettings
from pipeline.llm.fast_batch import FastDecodeBatch
from pipeline.llm.fast_engine import FastPhiEngine

SHORT, MEDIUM, LONG = [5, 17, 99, 3], [300, 12, 12, 450, 8, 1, 77], list(range(100, 130))


def greedy(tokens: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=tokens)


@pytest.fixture(scope="module")
def engine(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    return FastPhiEngine(model, model.config.eos_token_id, use_graphs=False, max_seq_len=256)


def alone(engine, prompt, tokens):
    """What generate gives this prompt alone, written out to `tokens` as the batch's rows are
    (generate stops at end-of-text; the batch leaves that to its caller)."""
    ids = engine.generate([prompt], greedy(tokens))[0].token_ids
    return ids + [engine.eos_token_id] if len(ids) < tokens else ids


def until_end(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def drive(batch, schedule: dict[int, list[tuple[list[int], int]]], max_steps: int = 2000) -> list[list[int]]:
    """Run the batch as the server does: schedule[step]'s (prompt, tokens) join together before that
    step; a row leaves once it has its tokens. Returns each row's tokens, in schedule order."""
    outputs: list[list[int]] = []
    wanted: list[int] = []
    live: dict[int, int] = {}
    for step in range(max_steps):
        joining = schedule.get(step, [])
        if joining:
            for (key, first), (_, tokens) in zip(batch.add([(p, greedy(t)) for p, t in joining]), joining):
                outputs.append([first])
                wanted.append(tokens)
                live[key] = len(outputs) - 1
        for key, index in list(live.items()):
            if len(outputs[index]) >= wanted[index]:
                batch.drop(key)
                del live[key]
        if not live and step > max(schedule):
            break
        for key, token in batch.step().items():
            outputs[live[key]].append(token)
    return outputs


def test_rows_of_any_length_joining_and_leaving_decode_what_they_decode_alone(engine):
    # a long row (200 tokens) beside a stream of short ones, the sum of their lengths past the cache
    # width the batch started with: under one shared column this pinned the cache's left edge
    schedule = {0: [(SHORT, 200)], 2: [(MEDIUM, 12), (LONG, 30)], 9: [(SHORT, 5)], 30: [(LONG, 40)],
                60: [(MEDIUM, 90), (SHORT, 3)], 75: [(LONG, 7)], 150: [(MEDIUM, 20)]}
    batch = FastDecodeBatch(engine, max_rows=4)
    got = drive(batch, schedule)
    want = [alone(engine, prompt, tokens) for step in sorted(schedule) for prompt, tokens in schedule[step]]
    assert [until_end(ids, engine.eos_token_id) for ids in got] == want
    assert len(batch) == 0 and not engine.cache.busy and batch.room() == 4
    assert engine.cache.blocks.used == 0  # every row's blocks came back


def test_a_request_that_does_not_fit_now_waits_and_one_that_never_fits_is_refused(engine):
    batch = FastDecodeBatch(engine, max_rows=2)
    keys = [key for key, _ in batch.add([(SHORT, greedy(5)), (MEDIUM, greedy(5))])]
    assert batch.room() == 0
    with pytest.raises(RuntimeError, match="room"):
        batch.add([(LONG, greedy(5))])
    with pytest.raises(InputTooLongError, match="at most 256 tokens"):
        batch.check(LONG, greedy(256 - len(LONG) + 1))
    batch.check(LONG, greedy(256 - len(LONG)))  # exactly the context: fits
    batch.drop(keys[0])
    assert batch.room() == 1
    (third, _), = batch.add([(LONG, greedy(5))])
    assert batch.rows[third].slot == 0  # the lowest free slot
    with pytest.raises(RuntimeError, match="one generate"):
        engine.generate([SHORT], greedy(3))
    for key in (keys[1], third):
        batch.drop(key)
    assert engine.generate([SHORT], greedy(5))[0].token_ids == alone(engine, SHORT, 5)


def test_a_failed_prefill_leaves_no_row_behind(engine, monkeypatch):
    batch = FastDecodeBatch(engine, max_rows=4)
    batch.prefill_tokens = 300  # the two prompts below are two prefill groups
    (kept, _), = batch.add([(SHORT, greedy(5))])
    calls = []

    def failing(rows):
        calls.append(len(rows))
        if len(calls) == 2:  # the second group of this add
            raise RuntimeError("the GPU fell over")
        return prefill(rows)

    prefill = batch._prefill_rows
    monkeypatch.setattr(batch, "_prefill_rows", failing)
    with pytest.raises(RuntimeError, match="fell over"):
        batch.add([(SHORT, greedy(200)), (list(range(1, 255)), greedy(2))])  # two groups: one fails
    assert len(batch) == 1 and batch.room() == 3
    assert engine.cache.blocks.held(batch.rows[kept].slot) and engine.cache.blocks.used == 1  # the kept row's
    batch.drop(kept)
    assert not engine.cache.busy
    with pytest.raises(RuntimeError, match="fell over"):
        calls.clear()
        batch.add([(SHORT, greedy(200)), (list(range(1, 255)), greedy(2))])
    assert len(batch) == 0 and batch.room() == 4 and not engine.cache.busy and engine.cache.blocks.used == 0


def test_a_burst_of_mixed_lengths_against_a_small_batch_all_complete_each_as_alone(engine):
    rng = random.Random(7)
    requests = [([rng.randrange(1, 450) for _ in range(rng.randrange(1, 40))], rng.choice([2, 9, 30, 120]))
                for _ in range(24)]
    batch = FastDecodeBatch(engine, max_rows=4)
    outputs, waiting, live = {}, list(range(len(requests))), {}
    for _ in range(5000):
        room = batch.room()
        joining, waiting = waiting[:room], waiting[room:]
        if joining:
            for index, (key, first) in zip(joining, batch.add([(requests[i][0], greedy(requests[i][1]))
                                                               for i in joining])):
                outputs[index], live[key] = [first], index
        for key, index in list(live.items()):
            if len(outputs[index]) >= requests[index][1]:
                batch.drop(key)
                del live[key]
        if not live and not waiting:
            break
        for key, token in batch.step().items():
            outputs[live[key]].append(token)
    assert sorted(outputs) == list(range(len(requests)))
    for index, (prompt, tokens) in enumerate(requests):
        assert until_end(outputs[index], engine.eos_token_id) == alone(engine, prompt, tokens), index


def test_sampling_rows_decode_beside_greedy_ones_and_are_reproducible(engine):
    sampled = GenerationSettings(max_new_tokens=15, temperature=0.8, top_p=0.9, seed=3)
    lone = engine.generate([MEDIUM], sampled)[0].token_ids  # what `ask` draws for this seed

    def run(with_greedy: bool) -> list[int]:
        batch = FastDecodeBatch(engine, max_rows=2)
        requests = [(MEDIUM, sampled)] + ([(LONG, greedy(15))] if with_greedy else [])
        added = batch.add(requests)
        out = {key: [first] for key, first in added}
        while any(len(tokens) < 15 for tokens in out.values()):
            for key, token in batch.step().items():
                out[key].append(token)
        got = {key: tokens[:15] for key, tokens in out.items()}
        for key in out:
            batch.drop(key)
        if with_greedy:
            assert until_end(got[added[1][0]], engine.eos_token_id) == alone(engine, LONG, 15)
        return got[added[0][0]]

    assert run(True) == run(False)
    assert until_end(run(False), engine.eos_token_id)[:len(lone)] == lone


def test_the_server_batches_the_fast_engine_continuously_by_default(engine):
    from pipeline.llm.continuous import open_decode_batch

    assert isinstance(open_decode_batch(engine, 4), FastDecodeBatch)  # auto
    assert isinstance(open_decode_batch(engine, 4, "continuous"), FastDecodeBatch)
    assert open_decode_batch(engine, 4, "micro") is None


@pytest.fixture
def fresh_engine(tiny_phi2_dir):
    """An engine of its own: a test that fixes a small block pool needs a cache nobody grew."""
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    return FastPhiEngine(model, model.config.eos_token_id, use_graphs=False, max_seq_len=256)


def test_joinable_counts_the_waiting_prompts_that_fit_in_order(fresh_engine):
    """generate and the server admit their waiting prompts with one joinable() call: slots first, then
    blocks (a block in hand for every row then live); every prefix of what fits fits."""
    batch = FastDecodeBatch(fresh_engine, max_rows=6, blocks=16)  # 15 usable blocks of 32 columns
    key, _ = batch.add([(SHORT, greedy(5))])[0]
    assert fresh_engine.cache.blocks.free == 14
    for lengths in ([40] * 8, [100, 100, 100, 100], [200, 5, 5], [5] * 3, []):
        count = batch.joinable(lengths)
        assert all(batch.joinable(lengths[:k]) == k for k in range(count + 1))
        assert count == len(lengths) or batch.joinable(lengths[:count + 1]) == count
    assert batch.joinable([200, 200, 5]) == 1  # 1 + 8 = 9 blocks, the second's 8 more would make 17: in order
    # 14 blocks free beside the live row's one; each newcomer needs its prompt's blocks and one more
    assert batch.joinable([5] * 8) == 5  # 1 + 2 * 5 blocks fit: the five free slots decide
    assert batch.joinable([40] * 8) == 4  # 1 + 3 * 4 = 13 blocks fit, a fifth would make 16
    assert batch.joinable([100] * 4) == 2  # 1 + 5 * 2 = 11, a third would make 16
    batch.drop(key)


def test_rows_freed_and_blocks_placed_reach_the_table_in_their_order_before_it_is_read(fresh_engine):
    """The cache settles frees and placements in one copy each before a step or prefill reads the
    table: a row placed then freed points at the trash block and stops; a slot freed then taken again
    keeps its new blocks and settings."""
    from pipeline.llm.blocks import TRASH_BLOCK

    cache = fresh_engine.cache
    cache.reserve(8)
    cache.reset_rows()
    cache.write_rows([0, 1, 2], col=[40, 9, 3], advance=[1, 1, 1])
    cache.place(0, 0, [3, 4])
    cache.place(1, 0, [5])
    cache.free_row(0)
    cache.place(1, 1, [6])
    cache.free_row(2)
    cache.place(2, 0, [7])
    table = cache.state(3).table
    assert table[0].eq(TRASH_BLOCK).all() and cache.advance[0] == 0 and cache.col[0] == 0
    assert table[1, :3].tolist() == [5, 6, TRASH_BLOCK] and cache.advance[1] == 1 and cache.col[1] == 9
    assert table[2, :2].tolist() == [7, TRASH_BLOCK] and cache.advance[2] == 0
    cache.write_rows([2], col=[5], advance=[1])  # the slot's new row
    cache.free_row(1)
    cache.write_rows([0], col=[1])  # writing a row settles the frees first
    assert cache.table[1].eq(TRASH_BLOCK).all() and cache.col.tolist()[:3] == [1, 0, 5]


@pytest.mark.parametrize("sampled", [False, True])
def test_rows_preempted_when_the_blocks_run_short_resume_with_their_alone_tokens(fresh_engine, sampled):
    engine = fresh_engine
    rng = random.Random(11)
    settings = (GenerationSettings(max_new_tokens=60, temperature=0.9, top_p=0.95, seed=5) if sampled
                else greedy(60))
    prompts = [[rng.randrange(1, 450) for _ in range(rng.randrange(20, 60))] for _ in range(6)]
    want = [engine.generate([p], settings)[0].token_ids for p in prompts]
    # 6 rows of ~100 columns need ~24 blocks of 32 at their ends; 12 usable blocks make rows wait and be preempted
    batch = FastDecodeBatch(engine, max_rows=6, blocks=13)
    outputs, live, waiting = {}, {}, list(range(len(prompts)))
    for _ in range(5000):
        while waiting and batch.joinable([len(prompts[waiting[0]])]):
            index = waiting.pop(0)
            (key, first), = batch.add([(prompts[index], settings)])
            outputs[index], live[key] = [first], index
        for key, token in batch.step().items():
            outputs[live[key]].append(token)
        for key, index in list(live.items()):
            if len(outputs[index]) >= 60 or engine.eos_token_id in outputs[index]:
                batch.drop(key)
                del live[key]
        assert engine.cache.blocks.used <= 12
        if not live and not waiting:
            break
    assert batch.preemptions > 0
    assert [until_end(outputs[i], engine.eos_token_id)[:60] for i in range(len(prompts))] == \
        [w + [engine.eos_token_id] if len(w) < 60 else w for w in want]
    assert engine.cache.blocks.used == 0 and not engine.cache.busy


def test_a_row_whose_logits_overflow_fails_alone_and_the_others_decode_on(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    poison = 7
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("inf")  # any row that reads it overflows
    engine = FastPhiEngine(model, model.config.eos_token_id, use_graphs=False, max_seq_len=256)
    clean = [SHORT, MEDIUM]
    want = [alone(engine, p, 8) for p in clean]
    batch = FastDecodeBatch(engine, max_rows=4)
    added = batch.add([(SHORT, greedy(8)), ([5, poison, 9], greedy(8)), (MEDIUM, greedy(8))])
    assert isinstance(added[1][1], BaseException) and "non-finite" in str(added[1][1])
    assert len(batch) == 2
    got = {added[0][0]: [added[0][1]], added[2][0]: [added[2][1]]}
    while any(len(v) < 8 for v in got.values()):
        for key, token in batch.step().items():
            got[key].append(token)
    assert [until_end(got[added[i][0]][:8], engine.eos_token_id) for i in (0, 2)] == want


def _triton_runs_here() -> bool:
    import os

    from pipeline.kernels.phi_attention import triton

    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_runs_here(), reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_the_triton_kernels_decode_through_the_block_table_what_the_torch_path_decodes(tiny_phi2_dir):
    """The same paged engine with the Triton kernels (on the CPU through Triton's interpreter: minutes)
    and without: the same tokens alone, and rows preempted and resumed still as alone."""
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    kernels, torch_path = (FastPhiEngine(model, model.config.eos_token_id, use_graphs=False, max_seq_len=256,
                                         use_triton=use) for use in (True, False))
    for prompt in (SHORT, MEDIUM, LONG):
        assert kernels.generate([prompt], greedy(24))[0].token_ids == \
            torch_path.generate([prompt], greedy(24))[0].token_ids
    test_rows_preempted_when_the_blocks_run_short_resume_with_their_alone_tokens(kernels, sampled=False)
