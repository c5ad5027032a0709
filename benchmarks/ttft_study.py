"""Where a served answer's first token waits: the server's answer scheduler driven in-process.

serve_load.py measures time to the first English *text* over HTTP; this script takes the HTTP layer
and the translators away to see the scheduler and the engine alone. It loads the same checkpoints
(serve_load.py's build: published shapes, random weights), translates the four Japanese questions
once, and then, for each admission setting (`--chunks`: the padded prompt tokens one prefill may
hold, `batch.prefill_tokens`), runs the closed loop serve_load runs: `--clients` callers at once,
each asking `--rounds` questions in turn with `--answer-tokens` raw answers, through the real
`AnswerScheduler` on its own thread. For every request it records
- first token: submit -> the first answer token reaches the caller's loop;
- first text: submit -> the first token after which the raw answer shows any text (what serve_load's
  "TTFT" sees: a random-weight answer may decode to nothing visible for many tokens);
and the aggregate answer tokens/s. It also prints, per question, the prompt's length and the first
ids the answer model writes, with how many tokens pass before the raw answer shows text.

    python benchmarks/ttft_study.py                          # published shapes, on the GPU
    python benchmarks/ttft_study.py --chunks 2048 8192       # two admission settings
    python benchmarks/ttft_study.py --tiny --clients 4 --answer-tokens 16   # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import tempfile
import time
from pathlib import Path

from serve_load import QUESTIONS, build, percentile  # noqa: E402 - beside this file


def visible_after(tokenizer, question: str, ids: list[int]) -> int | None:
    """How many ids pass before the raw answer shows text (None: never, within these ids)."""
    from pipeline.llm.answerer import AnswerPieces

    pieces = AnswerPieces(tokenizer, question, raw=True)
    for count, token in enumerate(ids, 1):
        if pieces.push(token):
            return count
    return None


async def one(scheduler, prompt, settings, tokenizer, question) -> dict:
    from pipeline.llm.answerer import AnswerPieces
    from pipeline.serve.batching import AnswerJob

    pieces = AnswerPieces(tokenizer, question, raw=True)
    began = time.perf_counter()
    job = AnswerJob(prompt, settings, asyncio.get_running_loop())
    scheduler.submit(job)
    first = text = None
    tokens = 0
    async for arrived in job:
        for value in arrived:
            tokens += 1
            now = time.perf_counter() - began
            first = now if first is None else first
            if text is None and pieces.push(value):
                text = now
    return {"first": first, "text": text if text is not None else float("nan"), "tokens": tokens,
            "total": time.perf_counter() - began}


async def closed_loop(scheduler, prompts, questions, settings, tokenizer, clients: int, rounds: int) -> dict:
    samples: list[dict] = []

    async def client(index: int):
        for round_ in range(rounds):
            k = (index + round_) % len(prompts)
            samples.append({**await one(scheduler, prompts[k], settings, tokenizer, questions[k]), "round": round_})

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - began
    firsts = [s["first"] for s in samples]
    texts = [s["text"] for s in samples]
    return {"requests": len(samples), "tokens_per_s": sum(s["tokens"] for s in samples) / wall,
            "first_p50": percentile(firsts, 0.5), "first_p99": percentile(firsts, 0.99),
            "wave_p50": percentile([s["first"] for s in samples if s["round"] == 0], 0.5),
            "later_p50": percentile([s["first"] for s in samples if s["round"] > 0], 0.5),
            "text_p50": percentile(texts, 0.5), "text_p99": percentile(texts, 0.99),
            "with_text": sum(t == t for t in texts), "total_p50": percentile([s["total"] for s in samples], 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--models", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from pipeline import BilingualQA, GenerationSettings
    from pipeline.serve.batching import AnswerScheduler

    root = args.models or Path(tempfile.gettempdir()) / ("serve-load-tiny" if args.tiny else "serve-load-published")
    paths = build(root, args.tiny)
    qa = BilingualQA.from_pretrained(str(paths["llm"]), str(paths["ja_en"]), str(paths["en_ja"]))
    answerer = qa.answerer
    settings = GenerationSettings(max_new_tokens=args.answer_tokens, raw=True)
    english = qa.ja_en.translate(QUESTIONS)
    prompts = [answerer.encode(text, args.answer_tokens) for text in english]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"ttft_study on {device}, torch {torch.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC;"
          f" engine {answerer.engine.name}; command: {' '.join(sys.argv)}")
    for text, prompt in zip(english, prompts):
        ids = answerer.engine.generate([prompt], settings)[0].token_ids
        print(f"prompt {len(prompt)} tokens: first ids {ids[:16]}; text shows after"
              f" {visible_after(answerer.tokenizer, text, ids)} of {len(ids)} tokens")
    print("\n| clients | prefill tokens | requests | tokens/s | first token p50 / p99 ms |"
          " first token p50 ms, first round / later | first text p50 / p99 ms | with text | request p50 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    scheduler = AnswerScheduler(answerer.engine, max_rows=max(args.clients))
    try:
        for chunk in args.chunks:
            scheduler.decode_batch.prefill_tokens = chunk
            for clients in args.clients:
                asyncio.run(closed_loop(scheduler, prompts, english, settings, answerer.tokenizer, 4, 1))  # warm
                row = asyncio.run(closed_loop(scheduler, prompts, english, settings, answerer.tokenizer,
                                              clients, args.rounds))
                print(f"| {clients} | {chunk} | {row['requests']} | {row['tokens_per_s']:,.0f} |"
                      f" {row['first_p50'] * 1e3:.0f} / {row['first_p99'] * 1e3:.0f} |"
                      f" {row['wave_p50'] * 1e3:.0f} / {row['later_p50'] * 1e3:.0f} |"
                      f" {row['text_p50'] * 1e3:.0f} / {row['text_p99'] * 1e3:.0f} | {row['with_text']} |"
                      f" {row['total_p50']:.3f} |", flush=True)
    finally:
        scheduler.close()


if __name__ == "__main__":
    main()
