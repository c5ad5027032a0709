"""Continuous batching at phi-2's published shape on the GPU (random weights, float16, CUDA graphs):
rows of 20 to 1,800 tokens join and leave a running 64-row batch, each equal token for token to the
same row decoded alone, and a burst of 200 mixed-length requests through the server's scheduler all
complete. Skipped without CUDA; tests/llm/test_fast_batch.py and tests/serve/test_scheduler.py are
the CPU equivalents (tiny checkpoints, graphs off).

"Alone" is the row by itself in the same graph bucket (`bucket=64`): a float16 matrix product of
16 rows and one of 64 are different cuBLAS/Triton kernels and round differently, and with random
weights a greedy argmax follows any rounding; within one bucket a row's arithmetic depends on its
own inputs only, which is what joining, leaving and the slots' own lengths must not disturb.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BUCKET = 64


@pytest.fixture(scope="module")
def model():
    from transformers import PhiForCausalLM

    from pipeline.checkpoints import phi2_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PhiForCausalLM(phi2_config(vocab_size=51200)).eval().to(torch.float16)  # the published shape
    yield model
    del model
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def engine(model):
    from pipeline.llm.fast_engine import FastPhiEngine

    return FastPhiEngine(model, model.config.eos_token_id, max_seq_len=2048)


def settings(tokens: int, **sampling):
    from pipeline.spec import GenerationSettings

    return GenerationSettings(max_new_tokens=tokens, **sampling)


def prompt_of(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 50000) for _ in range(length)]


def decode(batch, schedule: dict[int, list[tuple[list[int], int]]], **sampling) -> list[list[int]]:
    """schedule[step]'s rows join before that step (one prefill each), leave with their tokens; a row
    the blocks cannot take yet waits for its turn."""
    outputs, wanted, live, step, waiting = [], [], {}, 0, []
    while step <= max(schedule) or live or waiting:
        waiting += schedule.get(step, [])
        while waiting and batch.joinable([len(waiting[0][0])]):
            prompt, tokens = waiting.pop(0)
            (key, first), = batch.add([(prompt, settings(tokens, **sampling))])
            outputs.append([first])
            wanted.append(tokens)
            live[key] = len(outputs) - 1
        for key, index in list(live.items()):
            if len(outputs[index]) >= wanted[index]:
                batch.drop(key)
                del live[key]
        for key, token in batch.step().items():
            outputs[live[key]].append(token)
        step += 1
    return outputs


def test_rows_of_20_to_1800_tokens_joining_and_leaving_a_64_row_batch_decode_as_alone(engine):
    from pipeline.llm.fast_batch import FastDecodeBatch

    rng = random.Random(5)
    schedule: dict[int, list[tuple[list[int], int]]] = {}
    rows = [(0, 30, 1800), (0, 400, 20), (3, 12, 600), (40, 100, 1200), (700, 8, 1000)]
    rows += [(rng.randrange(0, 1500), rng.randrange(4, 200), rng.randrange(20, 120)) for _ in range(60)]
    rows += [(100, rng.randrange(4, 60), 40) for _ in range(20)]  # twenty joining at one step
    for step, length, tokens in rows:
        schedule.setdefault(step, []).append((prompt_of(rng, length), tokens))
    batch = FastDecodeBatch(engine, max_rows=64, bucket=BUCKET)
    got = decode(batch, schedule)
    assert engine.cache.blocks.used == 0 and not engine.cache.busy  # every row's blocks came back
    flat = [row for step in sorted(schedule) for row in schedule[step]]
    mismatched = []
    for index, (prompt, tokens) in enumerate(flat):
        want = decode(FastDecodeBatch(engine, max_rows=64, bucket=BUCKET), {0: [(prompt, tokens)]})[0]
        if got[index] != want:
            first = next(i for i, (a, b) in enumerate(zip(got[index], want)) if a != b)
            mismatched.append((index, len(prompt), tokens, first))
    assert not mismatched, f"rows (index, prompt, tokens, first differing token) not as alone: {mismatched}"


def test_a_burst_of_200_mixed_requests_against_a_64_row_batch_all_complete(engine):
    from pipeline.spec import GenerationSettings
    from pipeline.serve.batching import AnswerJob, AnswerScheduler

    rng = random.Random(9)
    requests = [(prompt_of(rng, rng.randrange(5, 300)),
                 GenerationSettings(max_new_tokens=rng.choice([20, 60, 200, 700, 1500])))
                for _ in range(200)]
    scheduler = AnswerScheduler(engine, max_rows=64)
    assert scheduler.mode == "continuous" and scheduler.decode_batch.max_rows == 64

    async def answer(job):
        count = sum([len(tokens) async for tokens in job])
        return count, job.eos

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [AnswerJob(prompt, settings_, loop) for prompt, settings_ in requests]
        for job in jobs:
            scheduler.submit(job)
        return await asyncio.wait_for(asyncio.gather(*(answer(job) for job in jobs)), 500)

    try:
        results = asyncio.run(run())
    finally:
        scheduler.close()
    assert len(results) == 200
    for (_, settings_), (count, eos) in zip(requests, results):
        assert count == settings_.max_new_tokens or (eos and count < settings_.max_new_tokens)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.95, "seed": 4}])
def test_rows_preempted_when_the_blocks_run_short_resume_as_alone(engine, sampling):
    """60 rows of up to ~700 columns against a pool of 400 blocks of 32 (about 12,800 tokens): rows
    wait for blocks, the latest joined are preempted (swapped out) when the live ones grow and come
    back later, and each row's tokens (greedy, and seeded sampling from its own seed) equal it alone."""
    from pipeline.llm.fast_batch import FastDecodeBatch

    rng = random.Random(21)
    schedule = {rng.randrange(0, 200): [] for _ in range(20)}
    for step in list(schedule):
        schedule[step] += [(prompt_of(rng, rng.randrange(20, 200)), rng.randrange(100, 500)) for _ in range(3)]
    engine.cache.release()  # a small pool of its own
    batch = FastDecodeBatch(engine, max_rows=64, bucket=BUCKET, blocks=401)
    got = decode(batch, schedule, **sampling)
    assert batch.preemptions > 0 and engine.cache.blocks.used == 0
    engine.cache.release()
    flat = [row for step in sorted(schedule) for row in schedule[step]]
    # "alone": in the same bucket a row's arithmetic depends on its own inputs only, so all of them at
    # once in a pool that holds them all (each prefilled by itself) is each of them alone
    alone = decode(FastDecodeBatch(engine, max_rows=64, bucket=BUCKET), {0: flat}, **sampling)
    mismatched = [(index, len(prompt), tokens, next(i for i, (a, b) in enumerate(zip(got[index], alone[index]))
                                                     if a != b))
                  for index, (prompt, tokens) in enumerate(flat) if got[index] != alone[index]]
    assert not mismatched, f"rows (index, prompt, tokens, first differing token) not as alone: {mismatched}"


def test_a_seeded_answer_is_the_same_from_generate_stream_and_the_batch_in_one_bucket(engine):
    """The one sampler on the GPU with graphs: a seeded row draws the same tokens whether generate,
    stream or a busy continuous batch decodes it (all in the 64-row bucket: buckets of other sizes
    round their products differently, which random weights follow)."""
    from pipeline.llm.fast_batch import FastDecodeBatch

    rng = random.Random(33)
    sampling = {"temperature": 0.7, "top_p": 0.9, "seed": 12}
    prompt = prompt_of(rng, 90)
    others = {0: [(prompt_of(rng, rng.randrange(10, 300)), rng.randrange(50, 300)) for _ in range(40)]}
    others[7] = [(prompt, 200)]
    busy = decode(FastDecodeBatch(engine, max_rows=64, bucket=BUCKET), others, **sampling)[-1]
    alone = decode(FastDecodeBatch(engine, max_rows=64, bucket=BUCKET), {0: [(prompt, 200)]}, **sampling)[0]
    assert busy == alone
    with_eos = lambda ids: ids + [engine.eos_token_id] if len(ids) < 200 else ids  # noqa: E731
    gen = engine.generate([prompt] * 64, settings(200, **sampling))  # generate's rows run in the 64 bucket
    assert all(with_eos(g.token_ids) == alone[:len(with_eos(g.token_ids))] for g in gen)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.95, "seed": 9}])
def test_tokens_copied_to_the_host_on_a_second_stream_are_the_tokens_copied_on_the_decode_stream(model, engine,
                                                                                                  sampling):
    """DecodeConfig.host_copy_beside: the copies overlap the next step, whose kernels write new tokens
    (and whose allocations could take the copied tensors' memory): rows joining and leaving read the
    same tokens either way, in the same bucket."""
    from dataclasses import replace

    from pipeline.llm.fast_batch import FastDecodeBatch
    from pipeline.llm.fast_engine import FastPhiEngine

    rng = random.Random(21)
    schedule = {step: [(prompt_of(rng, rng.randrange(8, 300)), rng.randrange(20, 160)) for _ in range(6)]
                for step in (0, 5, 30, 90)}
    beside = FastPhiEngine(model, engine.eos_token_id, max_seq_len=2048,
                           config=replace(engine.config, host_copy_beside=True))
    want = decode(FastDecodeBatch(engine, max_rows=64, bucket=BUCKET), schedule, **sampling)
    assert decode(FastDecodeBatch(beside, max_rows=64, bucket=BUCKET), schedule, **sampling) == want
    beside.cache.release()
