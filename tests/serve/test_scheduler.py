"""The server's AnswerScheduler over FastPhiEngine's continuous batch (CPU, graphs off): a burst far
larger than the batch waits for rows instead of failing, every request completes with the answer it
gets alone, and a caller that leaves frees its row at the next step."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.serve.batching import AnswerJob, AnswerScheduler


@pytest.fixture(scope="module")
def engine(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    return FastPhiEngine(model, model.config.eos_token_id, use_graphs=False, max_seq_len=512)


async def answer(job: AnswerJob) -> list[int]:
    return [token async for tokens in job for token in tokens]


def burst(count: int, seed: int) -> list[tuple[list[int], GenerationSettings]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, 450) for _ in range(rng.randrange(1, 60))],
             GenerationSettings(max_new_tokens=rng.choice([1, 3, 12, 40, 100]))) for _ in range(count)]


def test_a_burst_far_past_the_batch_all_complete_each_with_its_answer_alone(engine):
    requests = burst(200, seed=11)
    scheduler = AnswerScheduler(engine, max_rows=8)
    assert scheduler.mode == "continuous" and scheduler.decode_batch.max_rows == 8

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [AnswerJob(prompt, settings, loop) for prompt, settings in requests]
        for job in jobs:  # all at once: 200 against 8 rows
            scheduler.submit(job)
        return await asyncio.wait_for(asyncio.gather(*(answer(job) for job in jobs)), 600)

    try:
        got = asyncio.run(run())
    finally:
        scheduler.close()
    assert len(got) == len(requests)
    for (prompt, settings), tokens in zip(requests, got):
        assert tokens == engine.generate([prompt], settings)[0].token_ids


def test_a_caller_that_leaves_frees_its_row_at_the_next_step(engine):
    scheduler = AnswerScheduler(engine, max_rows=2)
    produced = []
    scheduler.on_tokens = produced.append

    async def run():
        loop = asyncio.get_running_loop()
        job = AnswerJob([5, 17, 99, 3], GenerationSettings(max_new_tokens=400), loop)
        scheduler.submit(job)
        while job.count < 3:
            await asyncio.sleep(0.01)
        job.cancel()
        deadline = time.monotonic() + 30
        while scheduler.running_rows and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return job.count

    try:
        count = asyncio.run(run())
        assert scheduler.running_rows == 0
        assert len(scheduler.decode_batch) == 0 and scheduler.decode_batch.room() == 2
    finally:
        scheduler.close()
    assert sum(produced) < 400 and count < 400


def test_the_engine_profile_is_logged_when_the_engine_goes_idle_not_at_the_next_arrival(engine, monkeypatch,
                                                                                        caplog):
    """The scheduler's line (rows, cache blocks, preemptions) comes every REPORT_SECONDS while it
    works; the last stretch of a burst is logged once the engine idles, not held until someone asks
    again (serve_load.py reads the rows a run reached from these lines)."""
    from pipeline.serve.engine_profile import EngineProfile

    monkeypatch.setattr(EngineProfile, "REPORT_SECONDS", 0.5)
    scheduler = AnswerScheduler(engine, max_rows=4)

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [AnswerJob([5, 17, 99, 3], GenerationSettings(max_new_tokens=3), loop) for _ in range(3)]
        for job in jobs:
            scheduler.submit(job)
        await asyncio.gather(*(answer(job) for job in jobs))
        await asyncio.sleep(1.5)  # idle: nothing arrives

    try:
        with caplog.at_level("INFO", logger="bilingual_qa.serve"):
            asyncio.run(run())
    finally:
        scheduler.close()
    lines = [record.getMessage() for record in caplog.records if "answer engine, last" in record.getMessage()]
    assert lines and any("rows (at most 3)" in line for line in lines), lines
    assert "cache blocks" in lines[-1] and lines[-1].endswith("0 rows preempted")


def poisoned_engines(tiny_phi2_dir):
    """Both engines over a tiny phi-2 whose token 7 overflows (its embedding is inf): any row that
    reads it gets non-finite logits."""
    from transformers import PhiForCausalLM

    from pipeline.llm.engine import TransformersEngine

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("inf")
    eos = model.config.eos_token_id
    return {"fast": FastPhiEngine(model, eos, use_graphs=False, max_seq_len=512),
            "transformers": TransformersEngine(model, eos)}


@pytest.mark.parametrize("kind,batching", [("fast", "continuous"), ("transformers", "continuous"),
                                           ("transformers", "micro")])
def test_a_request_that_breaks_its_row_fails_alone_and_the_thread_serves_on(tiny_phi2_dir, kind, batching):
    engine = poisoned_engines(tiny_phi2_dir)[kind]
    settings = GenerationSettings(max_new_tokens=6, temperature=1e-300, seed=1)  # the floor: sampled, finite
    good = [[5, 17, 99, 3], [12, 40, 41], [300, 301]]
    bad = [[5, 7, 9], [len(good) * 10**9]]  # overflowing logits; a token id past the vocabulary
    scheduler = AnswerScheduler(engine, max_rows=8, batching=batching)

    async def run(prompts):
        loop = asyncio.get_running_loop()
        jobs = [AnswerJob(prompt, settings, loop) for prompt in prompts]
        for job in jobs:  # together: they share a prefill
            scheduler.submit(job)
        return await asyncio.wait_for(asyncio.gather(*(answer(job) for job in jobs), return_exceptions=True), 120)

    try:
        first = asyncio.run(run([good[0], bad[0], good[1], bad[1], good[2]]))
        again = asyncio.run(run(good))  # the stage still serves
    finally:
        scheduler.close()
    assert all(isinstance(first[i], BaseException) for i in (1, 3))
    want = [engine.generate([prompt], settings)[0].token_ids for prompt in good]
    assert [first[0], first[2], first[4]] == want and again == want
    assert scheduler.thread.is_alive() is False  # closed, not died: close() joined it
