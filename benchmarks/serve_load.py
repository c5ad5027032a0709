"""`bilingual-qa serve` under load: loopback clients in a closed loop at 1, 8 and 64 concurrent clients.

Builds random-weight checkpoints at the published shapes (phi-2 2.78B, opus-mt/fugumt 6+6 layers) in
the published formats, then in one run:
1. the engine's own batch-8 and batch-64 decode throughput (FastPhiEngine.generate on 8 and 64
   prompts, as llm_decode.py measures it), and one question asked in-process through BilingualQA.ask
   (the single-client bar);
2. `bilingual-qa serve` in a subprocess (its default batching unless --batching); for each client
   count, every client asks Japanese questions one after another with `"stream": true, "raw": true`
   and 200-token answers (random weights never write end-of-text; raw, because a trimmed stream
   rightly holds a line back until the answer-end rules decide it), for --rounds questions each;
3. a mixed-length run: 64 clients, each answer's length drawn between 32 and 1,500 tokens
   (log-uniform, seeded), --rounds questions each;
4. one table: aggregate answer tokens/s against the engine's batch throughput, p50/p99 time to the
   first English token, p50/p99 whole request time, the p50 of each server stage (from the
   results' timings: where a request's time goes), then the issue's targets, met or not.

    python benchmarks/serve_load.py                          # published shapes, on the GPU
    python benchmarks/serve_load.py --batching micro         # the micro-batching scheduler instead
    python benchmarks/serve_load.py --adapter                # base + an r=8 LoRA adapter, half the clients each
    python benchmarks/serve_load.py --tiny --clients 1 4 --mixed-clients 4 --mixed-max 40   # CPU smoke test

With --adapter the server holds phi-2 and a LoRA adapter of it (r=8 on q/k/v/dense/fc1/fc2, made by
peft, B random) in one batch (`serve --llm BASE --llm ADAPTER`), and odd-numbered clients ask the
adapter (`"model"` in /v1/ask): the running batch mixes base and adapter rows. The engine bars stay
the base alone's.

The table is also written to $OUT/serve_load.md when OUT is set (or to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
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


def build(root: Path, tiny: bool, adapter: bool = False) -> dict[str, Path]:
    import torch

    from pipeline.checkpoints import build_lora_adapter, build_tiny_marian, build_tiny_phi2

    paths = {"llm": root / "phi-2", "ja_en": root / "opus-mt-ja-en", "en_ja": root / "fugumt-en-ja"}
    if adapter:
        paths["adapter"] = root / "phi-2-finance"
    if (paths["llm"] / "config.json").exists():
        if adapter and not (paths["adapter"] / "adapter_config.json").exists():
            build_lora_adapter(paths["adapter"], paths["llm"], device="cpu" if tiny else "cuda",
                               dtype=None if tiny else torch.float16)
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
    if adapter:
        build_lora_adapter(paths["adapter"], paths["llm"], device="cpu" if tiny else "cuda",
                           dtype=None if tiny else torch.float16)
    return paths


def percentile(values: list[float], share: float) -> float:
    """nan values (a request whose answer showed no English before its result) are left out."""
    ordered = sorted(v for v in values if v == v)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))] if ordered else float("nan")


ENGLISH_QUESTIONS = [
    "How do rising interest rates affect households and companies?",
    "What is inflation, and how does it affect a family's budget?",
    "Explain the difference between stocks and bonds in simple terms.",
    "What is compound interest? Give an example.",
]


def in_process(paths: dict[str, Path], tokens: int, batches: list[int], engine: str, mt_backend: str) -> dict:
    """The bars, measured in-process on the server's models: the answer engine's own throughput at each
    batch size (generate on the prompts the server's rows hold: each Japanese question's English
    translation, cycled; and on a short English prompt, the figure llm_decode.py measures), and one
    question through BilingualQA.ask (warm), the bar one client's request is held to."""
    import torch

    from pipeline import BilingualQA, GenerationSettings

    qa = BilingualQA.from_pretrained(str(paths["llm"]), str(paths["ja_en"]), str(paths["en_ja"]), engine=engine,
                                     mt_backend=mt_backend)
    answerer = qa.answerer
    settings = GenerationSettings(max_new_tokens=tokens, raw=True)  # as the clients ask
    served = [answerer.encode(english, tokens) for english in qa.ja_en.translate(QUESTIONS)]
    short = answerer.encode(ENGLISH_QUESTIONS[0], tokens)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def throughput(prompts: list[list[int]]) -> float:
        answerer.engine.generate(prompts, settings)  # warm-up: cache, graphs
        sync()
        began = time.perf_counter()
        rows_out = answerer.engine.generate(prompts, settings)
        sync()
        return sum(len(row.token_ids) for row in rows_out) / (time.perf_counter() - began)

    bars = {"engine": {rows: throughput([served[i % len(served)] for i in range(rows)]) for rows in batches},
            "engine_short": {rows: throughput([short] * rows) for rows in batches},
            "prompt_tokens": sorted(len(p) for p in served), "short_tokens": len(short),
            "name": answerer.engine.name}
    qa.ask(QUESTIONS[0], settings=settings)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        qa.ask(QUESTIONS[0], settings=settings)
        times.append(time.perf_counter() - began)
    bars["alone"] = statistics.median(times)
    del qa, answerer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return bars


def start_server(paths: dict[str, Path], engine: str, mt_backend: str, max_batch: int,
                 batching: str = "auto", gpu_memory: str | None = None) -> tuple[subprocess.Popen, str]:
    from pipeline.serve.ready import ServerNotReady, wait_until_ready

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--llm", str(paths["llm"]),
               *(["--llm", str(paths["adapter"])] if "adapter" in paths else []), "--ja-en", str(paths["ja_en"]), "--en-ja", str(paths["en_ja"]), "--engine", engine,
               "--mt-backend", mt_backend, "--max-queue", "4096"]
    # the server's own defaults unless asked otherwise (--max-batch 64, --batching auto)
    command += ["--max-batch", str(max_batch)] if max_batch != 64 else []
    command += ["--batching", batching] if batching != "auto" else []
    command += ["--gpu-memory", gpu_memory] if gpu_memory else []
    # The server's log goes to a file (a pipe nobody reads would fill and stall it), shown on failure.
    log = open(paths["llm"].parent / "server.log", "w")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process=server, timeout=600)
    except ServerNotReady as error:
        server.kill()
        raise SystemExit(f"{error}: {(paths['llm'].parent / 'server.log').read_text()[-2000:]}") from None
    return server, url


STAGES = ("translate_question", "answer", "translate_answer")


def served_models(url: str) -> list[str]:
    """The server's model ids, the default first (GET /v1/models)."""
    import httpx

    return [entry["id"] for entry in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]


async def one_request(client, url: str, question: str, tokens: int, model: str | None = None) -> dict:
    began = time.perf_counter()
    first = None
    result = None
    body = {"question": question, "max_new_tokens": tokens, "stream": True, "raw": True}
    if model is not None:
        body["model"] = model
    async with client.stream("POST", f"{url}/v1/ask", json=body) as response:
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
            "tokens": result["generated_tokens"], "stages": {k: result["timings"].get(k, 0.0) for k in STAGES}}


async def closed_loop(url: str, clients: int, rounds: int, lengths, warm_tokens: int, label: str,
                      questions: list[str] = QUESTIONS, models: list[str] | None = None) -> dict:
    """Every client asks `rounds` questions in turn; lengths(client, round) is each answer's length;
    client i asks models[i % len(models)] (None: the server's default)."""
    import httpx

    models = models or [None]
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        for question in questions:  # warm-up: translation memory, the cache's width
            for model in models:
                await one_request(client, url, question, warm_tokens, model)

        async def client_loop(index: int):
            for round_ in range(rounds):
                samples.append(await one_request(client, url, questions[(index + round_) % len(questions)],
                                                 lengths(index, round_), models[index % len(models)]))

        began = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - began
    ttft = [s["ttft"] for s in samples]
    total = [s["total"] for s in samples]
    return {"label": label, "clients": clients, "requests": len(samples),
            "with_english": sum(s["ttft"] == s["ttft"] for s in samples),
            "tokens_per_s": sum(s["tokens"] for s in samples) / wall,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "total_p50": percentile(total, 0.5), "total_p99": percentile(total, 0.99),
            "stages": {k: percentile([s["stages"][k] for s in samples], 0.5) for k in STAGES}}


PROFILE = re.compile(r"at most (\d+)\).*?(?:cache blocks (\d+) in use, (\d+) free; (\d+) rows preempted)?$")


def server_profile(log: Path, since: int) -> dict:
    """The most rows decoding at once, the most cache blocks in use (of all) and the rows preempted,
    from the scheduler's log lines written after byte `since` of the server's log."""
    found = {"rows": 0, "blocks": 0, "pool": 0, "preempted": 0}
    with open(log, "rb") as handle:
        handle.seek(since)
        for line in handle.read().decode(errors="replace").splitlines():
            match = PROFILE.search(line)
            if not match:
                continue
            found["rows"] = max(found["rows"], int(match.group(1)))
            if match.group(2):
                used, free = int(match.group(2)), int(match.group(3))
                found["blocks"] = max(found["blocks"], used)
                found["pool"] = used + free
                found["preempted"] += int(match.group(4))
    return found


def profiled(run, log: Path) -> dict:
    """run() (a closed loop's figures) with the server's profile over it (the log's lines every 5 s)."""
    since = log.stat().st_size
    row = run()
    time.sleep(5.5)  # the scheduler's last line of the run
    row["server"] = server_profile(log, since)
    return row


def row_line(row: dict, engine: dict[int, float]) -> str:
    batch = min((b for b in engine if b >= row["clients"]), default=max(engine))
    share = (f"{row['tokens_per_s'] / engine[batch]:.0%} of {batch}" if row["label"].startswith("fixed")
             and row["clients"] > 1 else "-")
    stages = " / ".join(f"{row['stages'][k]:.3f}" for k in STAGES)
    server = row.get("server") or {}
    blocks = f"{server['blocks']:,} of {server['pool']:,}" if server.get("pool") else "-"
    return (f"| {row['label']} | {row['clients']} | {row['requests']} | {row['tokens_per_s']:,.0f} |"
            f" {share} | {row['ttft_p50'] * 1e3:.0f} | {row['ttft_p99'] * 1e3:.0f} | {row['with_english']} |"
            f" {row['total_p50']:.3f} | {row['total_p99']:.3f} | {stages} | {server.get('rows', '-')} | {blocks} |"
            f" {server.get('preempted', '-') if server.get('pool') else '-'} |")


def mixed_lengths(low: int, high: int, seed: int = 0):
    """Answer lengths log-uniform in [low, high], fixed per (client, round)."""
    import math
    import random

    def length(client: int, round_: int) -> int:
        rng = random.Random(seed * 1_000_003 + client * 1009 + round_)
        return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))

    return length


def targets(rows: list[dict], engine: dict[int, float], alone: float) -> list[str]:
    """The issue's targets, each with the figure measured."""
    by = {(row["label"], row["clients"]): row for row in rows}
    checks = []

    def check(name: str, value: float, goal: float, higher: bool, unit: str):
        met = value >= goal if higher else value <= goal
        checks.append(f"| {name} | {value:{unit}} | {'>=' if higher else '<='} {goal:{unit}} | {'met' if met else 'NOT met'} |")

    if (row := by.get(("fixed", 64))) and 64 in engine:
        check("64 clients: share of batch-64 throughput", row["tokens_per_s"] / engine[64], 0.85, True, ".0%")
        check("64 clients: TTFT p50 (ms)", row["ttft_p50"] * 1e3, 250, False, ",.0f")
    if (row := by.get(("fixed", 8))) and 8 in engine:
        check("8 clients: share of batch-8 throughput", row["tokens_per_s"] / engine[8], 0.70, True, ".0%")
    if row := by.get(("fixed", 1)):
        check("1 client: TTFT p50 (ms)", row["ttft_p50"] * 1e3, 100, False, ",.0f")
        check("1 client: request p50 / in-process", row["total_p50"] / alone, 1.10, False, ".3f")
    for limit, goal in (("16GiB", 32), ("40GiB", 64)):
        if row := by.get((f"limited to {limit}", 64)):
            check(f"--gpu-memory {limit}: rows decoding at once", row["server"]["rows"], goal, True, ",.0f")
            check(f"--gpu-memory {limit}: requests failed", row.get("failed", 0), 0, False, ",.0f")
    return ["| target | measured | goal | |", "|---|---|---|---|", *checks] if checks else []


def limited_run(paths: dict[str, Path], args, limit: str, total_tokens: int) -> dict:
    """64 clients asking English questions whose prompt and answer take `total_tokens` together, against
    a server held to `limit` of the GPU (--gpu-memory: torch's per-process cap, e.g. a 16 GB T4's)."""
    server, url = start_server(paths, args.engine, args.mt_backend, 64, args.batching, gpu_memory=limit)
    log = paths["llm"].parent / "server.log"
    answer = total_tokens - 24  # the English questions' prompts are 17-21 tokens
    try:
        return profiled(lambda: asyncio.run(closed_loop(url, 64, args.limit_rounds, lambda c, r: answer, 16,
                                                        f"limited to {limit}", ENGLISH_QUESTIONS)), log)
    except RuntimeError as error:
        print(log.read_text()[-4000:], file=sys.stderr)
        return {"label": f"limited to {limit}", "clients": 64, "requests": 0, "with_english": 0, "tokens_per_s": 0,
                "ttft_p50": float("nan"), "ttft_p99": float("nan"), "total_p50": float("nan"),
                "total_p99": float("nan"), "stages": dict.fromkeys(STAGES, float("nan")),
                "server": server_profile(log, 0), "failed": 1, "error": str(error)}
    finally:
        server.terminate()
        server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=4, help="questions each client asks in turn")
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument("--mixed-clients", type=int, default=64, help="clients of the mixed-length run (0: none)")
    parser.add_argument("--mixed-min", type=int, default=32)
    parser.add_argument("--mixed-max", type=int, default=1500)
    parser.add_argument("--mixed-rounds", type=int, default=2)
    parser.add_argument("--engine", default="auto", choices=["auto", "fast", "transformers"])
    parser.add_argument("--batching", default="auto", choices=["auto", "continuous", "micro"],
                        help="the server's --batching")
    parser.add_argument("--mt-backend", default="auto")
    parser.add_argument("--adapter", action="store_true",
                        help="serve a LoRA adapter beside the base; odd-numbered clients ask it")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (CPU smoke test)")
    parser.add_argument("--models", type=Path, default=None, help="where to build the checkpoints")
    parser.add_argument("--gpu-memory", nargs="*", default=[], metavar="LIMIT",
                        help="also run 64 clients of --limit-tokens-token requests against a server held to each"
                             " limit (--gpu-memory 16GiB 40GiB: the article's T4 and an A100 40GB emulated)")
    parser.add_argument("--limit-tokens", type=int, default=1300, help="prompt + answer tokens of those requests")
    parser.add_argument("--limit-rounds", type=int, default=1)
    parser.add_argument("--skip-load", action="store_true", help="only the --gpu-memory runs (and the bars)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    root = args.models or Path(tempfile.gettempdir()) / ("serve-load-tiny" if args.tiny else "serve-load-published")
    paths = build(root, args.tiny, args.adapter)
    bars = in_process(paths, args.answer_tokens, [8, 64], args.engine, args.mt_backend)
    engine_tps = bars["engine"]
    print(f"in-process bars: {bars}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    failure = None
    models = None
    if not args.skip_load:
        server, url = start_server(paths, args.engine, args.mt_backend, max(64, *args.clients, args.mixed_clients),
                                   args.batching)
        log = root / "server.log"
        fixed = lambda client, round_: args.answer_tokens  # noqa: E731
        models = served_models(url) if args.adapter else None
        label = f"fixed, clients alternating {' / '.join(models)}" if models else "fixed"
        try:
            for clients in args.clients:
                rows.append(profiled(lambda: asyncio.run(closed_loop(  # noqa: B023 - called now
                    url, clients, args.rounds, fixed, args.answer_tokens, label, models=models)), log))
                print(row_line(rows[-1], engine_tps), file=sys.stderr, flush=True)
            if args.mixed_clients:
                # English questions: a Japanese one's random-weight translation is ~800 tokens, which would
                # leave too little of the 2,048-token context for the longest answers
                rows.append(profiled(lambda: asyncio.run(closed_loop(
                    url, args.mixed_clients, args.mixed_rounds, mixed_lengths(args.mixed_min, args.mixed_max),
                    args.mixed_max, f"mixed {args.mixed_min}-{args.mixed_max} (English)", ENGLISH_QUESTIONS,
                    models)), log))
        except RuntimeError as error:
            print((root / "server.log").read_text()[-4000:], file=sys.stderr)
            failure = error
        finally:
            server.terminate()
            server.wait(timeout=120)
    for limit in args.gpu_memory:
        rows.append(limited_run(paths, args, limit, args.limit_tokens))
        print(row_line(rows[-1], engine_tps), file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    speeds = lambda tps: ", ".join(f"batch {b} {v:,.0f}" for b, v in tps.items())  # noqa: E731
    lines = [f"serve_load on {device}, torch {torch.__version__}, {datetime.date.today()};"
             f" engine {bars['name']}, batching {args.batching},"
             f" models {' + '.join(models) if models else 'the base alone'}, raw streamed requests, {args.rounds} questions"
             f" per client ({args.mixed_rounds} in the mixed run)", "",
             f"engine alone, {args.answer_tokens}-token answers, on the server's prompts (the Japanese questions'"
             f" English, {bars['prompt_tokens']} tokens): {speeds(engine_tps)} answer tokens/s; on a"
             f" {bars['short_tokens']}-token English prompt: {speeds(bars['engine_short'])};"
             f" one question in-process (BilingualQA.ask, raw, warm): {bars['alone']:.3f} s", "",
             "| answers | clients | requests | answer tokens/s | share of engine batch | TTFT p50 ms | TTFT p99 ms |"
             " with English | request p50 s | request p99 s | p50 s: translate question / answer / translate answer |"
             " rows at once (most) | cache blocks used (most, of the pool) | rows preempted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row_line(row, engine_tps) for row in rows]
    lines += ["", *targets(rows, engine_tps, bars["alone"])]
    if failure is not None:
        lines += ["", f"FAILED: {failure}"]
    table = "\n".join(lines)
    print(table)
    out = args.out or (Path(os.environ["OUT"]) / "serve_load.md" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    if failure is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
