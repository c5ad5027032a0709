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
def engine():
    from transformers import PhiForCausalLM

    from pipeline.checkpoints import phi2_config
    from pipeline.llm.fast_engine import FastPhiEngine

    config = phi2_config(vocab_size=51200)  # the published shape
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PhiForCausalLM(config).eval().to(torch.float16)
    yield FastPhiEngine(model, config.eos_token_id, max_seq_len=2048)
    del model
    torch.cuda.empty_cache()


def settings(tokens: int):
    from pipeline.spec import GenerationSettings

    return GenerationSettings(max_new_tokens=tokens)


def prompt_of(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 50000) for _ in range(length)]


def decode(batch, schedule: dict[int, list[tuple[list[int], int]]]) -> list[list[int]]:
    """schedule[step]'s rows join before that step (one prefill each), leave with their tokens."""
    outputs, wanted, live, step = [], [], {}, 0
    while step <= max(schedule) or live:
        for prompt, tokens in schedule.get(step, []):
            (key, first), = batch.add([(prompt, settings(tokens))])
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
    assert batch.slots.columns == 2048  # grew from 512 for the long rows, while the others decoded
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
