"""`bilingual-qa serve` under load: loopback clients in a closed loop at 1, 8 and 64 concurrent clients.

Builds random-weight checkpoints at the published shapes (phi-2 2.78B, opus-mt/fugumt 6+6 layers) in
the published formats, then in one run:
1. the engine's own batch-64 decode throughput (FastPhiEngine.generate on 64 prompts, as llm_decode.py
   measures it), and one question asked in-process through BilingualQA.ask (the single-client bar);
2. `bilingual-qa serve` in a subprocess; for each client count, every client asks Japanese questions
   one after another with `"stream": true` and 200-token answers (random weights never write
   end-of-text), for --rounds questions each;
3. one table: aggregate answer tokens/s, p50/p99 time to the first English token, p50/p99 whole
   request time, the scheduler's mode, beside the engine's batch-64 figure.

    python benchmarks/serve_load.py                          # published shapes, on the GPU
    python benchmarks/serve_load.py --engine transformers    # continuous batching on transformers' model
    python benchmarks/serve_load.py --tiny --clients 1 4     # smoke test on the CPU

The table is also written to $OUT/serve_load.md when OUT is set (or to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？",
    "インフレーションとは何ですか？家計にどのような影響がありますか？",
    "株式と債券の違いを簡単に説明してください。",
    "複利とは何ですか？例を挙げて説明してください。",
]


def build(root: Path, tiny: bool) -> dict[str, Path]:
    import torch

    from pipeline.checkpoints import build_tiny_marian, build_tiny_phi2

    paths = {"llm": root / "phi-2", "ja_en": root / "opus-mt-ja-en", "en_ja": root / "fugumt-en-ja"}
    if (paths["llm"] / "config.json").exists():
        return paths
    if tiny:
        build_tiny_phi2(paths["llm"])
        marian: dict = {}
    else:
        build_tiny_phi2(paths["llm"], hidden=2560, layers=32, heads=32, vocab_rows=51200, dtype=torch.float16,
                        device="cuda")
        marian = dict(d_model=512, layers=6, ffn=2048, heads=8, vocab_size=60716)
    build_tiny_marian(paths["ja_en"], "ja", "en", **marian)
    build_tiny_marian(paths["en_ja"], "en", "ja", **marian)
    return paths


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))] if ordered else float("nan")


def engine_batch_throughput(paths: dict[str, Path], tokens: int, rows: int, engine: str) -> tuple[float, str]:
    """Answer tokens/s of the server's answer engine decoding `rows` prompts together, alone in-process."""
    import torch

    from pipeline.llm.answerer import Answerer
    from pipeline.llm.engine import GenerationSettings

    answerer = Answerer.from_pretrained(str(paths["llm"]), engine=engine)
    prompt = answerer.encode("How do rising interest rates affect households and companies?", tokens)
    prompts = [prompt] * rows
    settings = GenerationSettings(max_new_tokens=tokens)
    answerer.engine.generate(prompts, settings)  # warm-up: cache, graphs
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    began = time.perf_counter()
    rows_out = answerer.engine.generate(prompts, settings)
    sync()
    produced = sum(len(row.token_ids) for row in rows_out)
    name = answerer.engine.name
    del answerer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return produced / (time.perf_counter() - began), name


def in_process_question(paths: dict[str, Path], tokens: int, engine: str, mt_backend: str) -> float:
    """Seconds for one question through BilingualQA.ask, warm (the bar one client's request is held to)."""
    import torch

    from pipeline import BilingualQA, GenerationSettings

    qa = BilingualQA.from_pretrained(str(paths["llm"]), str(paths["ja_en"]), str(paths["en_ja"]), engine=engine,
                                     mt_backend=mt_backend)
    settings = GenerationSettings(max_new_tokens=tokens)
    qa.ask(QUESTIONS[0], settings=settings)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        qa.ask(QUESTIONS[0], settings=settings)
        times.append(time.perf_counter() - began)
    del qa
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return statistics.median(times)


def start_server(paths: dict[str, Path], engine: str, mt_backend: str, max_batch: int,
                 batching: str = "auto") -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--llm", str(paths["llm"]),
               "--ja-en", str(paths["ja_en"]), "--en-ja", str(paths["en_ja"]), "--engine", engine,
               "--mt-backend", mt_backend, "--max-batch", str(max_batch), "--max-queue", "4096",
               "--batching", batching]
    # The server's log goes to a file (a pipe nobody reads would fill and stall it), shown on failure.
    log = open(paths["llm"].parent / "server.log", "w")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {(paths['llm'].parent / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not load in 10 minutes")


async def one_request(client, url: str, question: str, tokens: int) -> dict:
    began = time.perf_counter()
    first = None
    result = None
    async with client.stream("POST", f"{url}/v1/ask", json={"question": question, "max_new_tokens": tokens,
                                                           "stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if event == "english" and first is None:
                    first = time.perf_counter() - began
            elif line.startswith("data: ") and event == "result":
                result = json.loads(line[6:])
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(f"the server failed the request: {line[6:]}")
    return {"ttft": first if first is not None else float("nan"), "total": time.perf_counter() - began,
            "tokens": result["generated_tokens"]}


async def closed_loop(url: str, clients: int, rounds: int, tokens: int) -> dict:
    import httpx

    samples: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, QUESTIONS[0], tokens)  # warm-up: graphs, caches

        async def client_loop(index: int):
            for round_ in range(rounds):
                samples.append(await one_request(client, url, QUESTIONS[(index + round_) % len(QUESTIONS)], tokens))

        began = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - began
    ttft = [s["ttft"] for s in samples]
    total = [s["total"] for s in samples]
    return {"clients": clients, "requests": len(samples), "tokens_per_s": sum(s["tokens"] for s in samples) / wall,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "total_p50": percentile(total, 0.5), "total_p99": percentile(total, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=4, help="questions each client asks in turn")
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument("--engine", default="auto", choices=["auto", "fast", "transformers"])
    parser.add_argument("--batching", default="auto", choices=["auto", "continuous", "micro"],
                        help="the server's --batching")
    parser.add_argument("--mt-backend", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (CPU smoke test)")
    parser.add_argument("--models", type=Path, default=None, help="where to build the checkpoints")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    root = args.models or Path(tempfile.gettempdir()) / ("serve-load-tiny" if args.tiny else "serve-load-published")
    paths = build(root, args.tiny)
    engine_tps, engine_name = engine_batch_throughput(paths, args.answer_tokens, 64, args.engine)
    alone = in_process_question(paths, args.answer_tokens, args.engine, args.mt_backend)
    server, url = start_server(paths, args.engine, args.mt_backend, max(64, *args.clients), args.batching)
    try:
        rows = [asyncio.run(closed_loop(url, clients, args.rounds, args.answer_tokens)) for clients in args.clients]
    except RuntimeError:
        print((root / "server.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=120)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    lines = [f"serve_load on {device}, torch {torch.__version__}, {datetime.date.today()};"
             f" engine {engine_name}, batching {args.batching}, {args.answer_tokens}-token answers, {args.rounds} questions per client",
             "", f"engine alone, batch 64 decode: {engine_tps:,.0f} answer tokens/s;"
             f" one question in-process (BilingualQA.ask, warm): {alone:.3f} s", "",
             "| clients | requests | answer tokens/s | share of batch-64 | TTFT p50 ms | TTFT p99 ms | request p50 s | request p99 s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['clients']} | {row['requests']} | {row['tokens_per_s']:,.0f} |"
                     f" {row['tokens_per_s'] / engine_tps:.0%} | {row['ttft_p50'] * 1e3:.0f} | {row['ttft_p99'] * 1e3:.0f} |"
                     f" {row['total_p50']:.3f} | {row['total_p99']:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = args.out or (Path(os.environ["OUT"]) / "serve_load.md" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


if __name__ == "__main__":
    main()
