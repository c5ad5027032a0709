"""phi-2 decode speed: transformers' generate, its static-cache generate, and FastPhiEngine.

Builds phi-2 at the published shape (tests/published_configs) with random fp16 weights directly on
the GPU, then prints one table: tokens/s and ms per generated token at several batch sizes, the
bandwidth floor measured in the same run (a large device-to-device copy), prefill time at 1,024
tokens, start-up time, peak GPU memory, and fp16 greedy agreement between the engine and generate.

    PYTHONPATH=. python benchmarks/llm_decode.py            # everything (~4 minutes on an H100)
    PYTHONPATH=. python benchmarks/llm_decode.py --quick    # batch 1 and 128, no static-cache path
    PYTHONPATH=. python benchmarks/llm_decode.py --skip-transformers --tune-attention   # kernel study

The table is also written to $OUT/llm_decode.md when OUT is set (or to --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch


from pipeline.llm.decode_config import DEFAULT_DECODE
from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine

EOS = 50256
VOCAB_DRAWN = 50000  # prompt ids are drawn below the tokenizer's size


def build_model(dtype: torch.dtype = torch.float16):
    """phi-2's published config, random weights in `dtype`, allocated on the GPU (no CPU copy)."""
    from pipeline.checkpoints import phi2_config
    from transformers import PhiForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = PhiForCausalLM(phi2_config()).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def wall(fn, repeat: int = 1) -> float:
    """Median seconds of `repeat` calls, synchronising around each."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def graph_ms(fn, replays: int) -> float:
    """Median milliseconds of one replay of fn (already run once: compiled, warmed) captured in a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 20
    del src, dst
    return 2 * (1 << 30) * 2 / seconds


def prompts_for(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_DRAWN, (batch, length), generator=generator).tolist()


def hf_generate(model, prompts, new_tokens: int, **kwargs) -> torch.Tensor:
    ids = torch.tensor(prompts, device="cuda")
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=EOS,
                          temperature=None, top_p=None, top_k=None, **kwargs)[:, ids.shape[1]:]


class Table:
    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, what: str, batch, tokens_per_s, ms_per_step, note: str = "") -> None:
        fmt = lambda x, spec: format(x, spec) if isinstance(x, (int, float)) else str(x)  # noqa: E731
        row = (what, str(batch), fmt(tokens_per_s, ",.0f"), fmt(ms_per_step, ".2f"), note)
        self.rows.append(row)
        print("  " + " | ".join(row), flush=True)

    def markdown(self) -> str:
        lines = ["| path | batch | tokens/s | ms/step | note |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def section(name: str, fn) -> None:
    """Run one part; a failure is printed and the rest of the benchmark still runs."""
    print(f"\n== {name}", flush=True)
    try:
        fn()
    except Exception:  # noqa: BLE001 - a benchmark reports every part it can
        traceback.print_exc()


# ---- attention kernel study (--tune-attention) -------------------------------------------------

def attention_candidates():
    """Kernel and tile variants of the decode attention: CUDA-core sums and tensor-core dots, the head
    read padded to 128 or as 64 + 16, tiles of 16-128 columns, 1-4 warps, 1-4 pipeline stages."""
    from pipeline.kernels.attention_tiles import AttentionConfig

    out = [AttentionConfig("sum", n, w, st, 1, dims) for dims in (False, True) for n in (32, 64)
           for w in (2, 4) for st in (1, 3)]
    out += [AttentionConfig("sum", n, 1, st, 1, True) for n in (16, 32) for st in (1, 3)]
    out += [AttentionConfig("dot", n, w, st, 1, True) for n in (32, 64, 128) for w in (2, 4) for st in (2, 3, 4)]
    out += [AttentionConfig("dot", 16, w, 3, 1, True) for w in (1, 2)] + [AttentionConfig("dot", 32, 1, 3, 1, True)]
    out += [AttentionConfig("dot", n, 4, 3, 1, False) for n in (32, 64)]
    return out


class AttentionBench:
    """32 layers of decode attention (rope + cache write + attention [+ merge]) captured in one graph,
    over a random paged cache of `length` columns per row: the shape one decode step reads."""

    def __init__(self, engine, rows: int, length: int):
        from pipeline.llm.phi_model import DecodeState

        w, cache = engine.weights, engine.cache
        self.engine, self.length = engine, length
        per_row = -(-(length + 1) // cache.block_size)
        cache.reserve(1 + rows * per_row)
        table = torch.arange(1, 1 + rows * per_row, device=engine.device).view(rows, per_row)
        self.k, self.v = cache.k, cache.v
        long = dict(dtype=torch.long, device=engine.device)
        self.table = table
        self.state = DecodeState(torch.zeros(rows, **long), torch.full((rows,), length - 1, **long),
                                 torch.tensor([length - 1], **long), torch.zeros(rows, **long), self.k, self.v,
                                 table, cache.block_size)
        gen = torch.Generator(device=engine.device).manual_seed(rows)
        self.qkv = torch.randn((rows, 3 * w.heads * w.head_dim), device=engine.device, dtype=w.dtype,
                               generator=gen)

    def layers(self, config, rope_inside: bool = True) -> list[torch.Tensor]:
        from pipeline.kernels.phi_attention import triton_attention

        e = self.engine
        return [triton_attention(self.qkv, self.state, self.k[i], self.v[i], e.cos, e.sin, e.weights, config,
                                 rope_inside=rope_inside, rope_warps=e.config.rope_warps, pdl=e.config.pdl)
                for i in range(self.k.shape[0])]

    def reference(self) -> torch.Tensor:
        """Layer 0's attention by SDPA in fp32 over columns 0..length-1 (after one kernel wrote the
        current key and value, which every variant writes identically)."""
        from pipeline.kernels.attention_tiles import AttentionConfig
        from pipeline.kernels.phi_attention import triton_attention
        from pipeline.llm.phi_model import _rotate  # the torch path's rotary, for the query

        e, w = self.engine, self.engine.weights
        triton_attention(self.qkv, self.state, self.k[0], self.v[0], e.cos, e.sin, w, AttentionConfig())
        raw = self.qkv.view(-1, 3, w.heads, 1, w.head_dim)[:, 0]
        pos = self.state.positions
        q = _rotate(raw, e.cos[pos][:, None, None], e.sin[pos][:, None, None], w.rotary_dim)
        size = self.engine.cache.block_size
        columns = torch.arange(self.length, device=self.table.device)

        def rows_columns(paged):  # [rows, heads, length, head_dim]
            return paged[self.table[:, columns // size], :, columns % size].permute(0, 2, 1, 3).float()

        keys, values = rows_columns(self.k[0]), rows_columns(self.v[0])
        return torch.nn.functional.scaled_dot_product_attention(q.float(), keys, values).reshape(q.shape[0], -1)

    def time(self, config, replays: int = 15, rope_inside: bool = True) -> tuple[float, float]:
        """(median us per layer, relative error of layer 0 against the fp32 reference)."""
        outs = self.layers(config, rope_inside)  # compile, then capture
        torch.cuda.synchronize()
        error = ((outs[0].float() - self.ref).norm() / self.ref.norm()).item()
        return graph_ms(lambda: self.layers(config, rope_inside), replays) * 1e3 / self.k.shape[0], error


def tune_attention(engine, batches: list[int], length: int, log: list[str]) -> dict:
    """Time every candidate at each batch size; return the fastest correct one per batch bucket."""
    from dataclasses import replace

    kv_bytes = lambda rows: 2 * rows * engine.weights.heads * length * engine.weights.head_dim * 2  # noqa: E731
    best = {}
    for rows in batches:
        bench = AttentionBench(engine, rows, length)
        bench.ref = bench.reference()
        now = engine.config.attention(rows)
        splits_first = now.splits
        results = []
        for config in attention_candidates():
            config = replace(config, splits=splits_first)
            try:
                us, error = bench.time(config)
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, skipped
                log.append(f"b{rows} {config}: failed {type(exc).__name__}: {str(exc)[:120]}")
                continue
            results.append((us, error, config))
        good = sorted(r for r in results if r[1] < 2e-3)
        for us, error, config in good[:4]:  # the best few, at other split counts
            for splits in sorted({1, 2, 4, 8, 16, 32} - {splits_first}):
                if rows * splits > 512:
                    continue
                try:
                    results.append((*bench.time(replace(config, splits=splits)), replace(config, splits=splits)))
                except Exception as exc:  # noqa: BLE001
                    log.append(f"b{rows} splits {splits}: failed {exc}")
        results.sort(key=lambda r: r[0])
        for us, error, config in results:
            flag = "" if error < 2e-3 else "  WRONG"
            log.append(f"b{rows} len {length}: {us:7.1f} us/layer {kv_bytes(rows) / us / 1e6:5.2f} TB/s "
                       f"err {error:.1e} {config}{flag}")
        current = next((r for r in results if r[2] == now), None)
        winner = next(r for r in results if r[1] < 2e-3)
        best[rows] = winner[2]
        print(f"  attention b{rows}: current {now} {current[0] if current else float('nan'):.1f} us/layer; "
              f"best {winner[2]} {winner[0]:.1f} us/layer ({kv_bytes(rows) / winner[0] / 1e6:.2f} TB/s)", flush=True)
        del bench
    return best


def warmup(engine, batches, prompt_len: int, new_tokens: int) -> float:
    """The block pool for the largest batch's whole run, and each batch size's graph; seconds spent."""
    began = time.perf_counter()
    engine.generate(prompts_for(max(batches), prompt_len), GenerationSettings(max_new_tokens=new_tokens))
    for batch in batches:
        engine.generate(prompts_for(batch, prompt_len), GenerationSettings(max_new_tokens=2))
    torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 128, no static-cache path")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--plain-tokens", type=int, default=64,
                        help="new tokens for plain generate (its ms/step is flat; 256 only costs time)")
    parser.add_argument("--static-batches", default="1", help="batches for the static-cache generate")
    parser.add_argument("--skip-transformers", action="store_true", help="time only FastPhiEngine")
    parser.add_argument("--profile", action="store_true",
                        help="also print the decode step's kernels by GPU time (batch 1 and the largest)")
    parser.add_argument("--tune-attention", action="store_true",
                        help="time the attention kernel variants first and use the fastest per batch size")
    parser.add_argument("--layer-variants", action="store_true",
                        help="also time batches >= 17 with the GELU as its own kernel, and with qkv, dense, "
                             "fc1, fc2 as four products per layer")
    parser.add_argument("--no-sdpa-variant", action="store_true", help="skip the use_triton=False engine")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batches = [1, 128] if args.quick else [1, 8, 32, 128]
    static_batches = [] if args.quick else [int(b) for b in args.static_batches.split(",") if b]
    table, facts = Table(), {}

    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    header = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)",
        f"versions: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
        f"{transformers.__version__}, triton {triton_version}",
        f"command: {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}",
        f"workload: phi-2 published shape, random fp16 weights, {args.prompt_len}-token prompts, "
        f"{args.new_tokens} new tokens (plain generate: {args.plain_tokens}), greedy",
    ]
    print("\n".join(header), flush=True)

    began = time.perf_counter()
    model = build_model()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model built in {time.perf_counter() - began:.1f} s: {weight_bytes / 1e9:.2f} GB of weights")

    def floor():
        bandwidth = copy_bandwidth()
        facts["bandwidth"] = bandwidth
        step = weight_bytes / bandwidth
        table.add("floor: weights read once per step", 1, 1 / step, step * 1e3,
                  f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    def plain():
        for batch in batches:
            prompts = prompts_for(batch, args.prompt_len)
            hf_generate(model, prompts, 4)
            seconds = wall(lambda: hf_generate(model, prompts, args.plain_tokens))
            table.add("model.generate", batch, batch * args.plain_tokens / seconds,
                      seconds / args.plain_tokens * 1e3)

    def static():
        for batch in static_batches:
            prompts = prompts_for(batch, args.prompt_len)
            first = wall(lambda: hf_generate(model, prompts, args.new_tokens, cache_implementation="static"))
            seconds = wall(lambda: hf_generate(model, prompts, args.new_tokens, cache_implementation="static"))
            table.add('generate(cache_implementation="static")', batch, batch * args.new_tokens / seconds,
                      seconds / args.new_tokens * 1e3, f"first call (compiles) {first:.1f} s")

    engines = {}
    decode_config = DEFAULT_DECODE  # the engine's settings; --tune-attention replaces its tiles

    def tune():
        nonlocal decode_config
        engine = FastPhiEngine(model, EOS, max_batch_size=max(batches), use_graphs=False)
        length = args.prompt_len + args.new_tokens // 2  # the mean cache length over a generate call
        engine.cache.reserve(1 + max(batches) * -(-(args.prompt_len + args.new_tokens) // engine.cache.block_size))
        engine.cache.k.normal_()
        engine.cache.v.normal_()
        log: list[str] = []
        try:
            with torch.inference_mode():
                best = tune_attention(engine, batches, length, log)
        finally:
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "attention_tune.txt").write_text("\n".join(log) + "\n")
            del engine
            torch.cuda.empty_cache()
        tiles = dict(decode_config.attention_tiles) | best
        decode_config = replace(decode_config, attention_tiles=tuple(sorted(tiles.items())))
        print("  ATTENTION_TILES = {" + ", ".join(f"{r}: {c}" for r, c in best.items()) + "}")
        facts["tuned"] = best

    def fast():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        engine = FastPhiEngine(model, EOS, max_batch_size=max(batches), config=decode_config)
        warm = warmup(engine, batches, args.prompt_len, args.new_tokens)
        facts["startup"] = time.perf_counter() - began
        facts["warmup"] = warm
        engines["fast"] = engine
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        for batch in batches:
            prompts = prompts_for(batch, args.prompt_len)
            engine.generate(prompts, settings)
            out = []
            seconds = wall(lambda: out.append(engine.generate(prompts, settings)), repeat=3)
            produced = sum(len(g.token_ids) for g in out[-1])
            note = "" if produced == batch * args.new_tokens else f"{produced} tokens (eos hit)"
            one = GenerationSettings(max_new_tokens=1)
            first = wall(lambda: engine.generate(prompts, one), repeat=3)  # noqa: B023 - prefill + 1 token
            note = "; ".join(filter(None, [note, f"of which prefill {first * 1e3:.1f} ms"]))
            table.add("FastPhiEngine.generate", batch, batch * args.new_tokens / seconds,
                      seconds / args.new_tokens * 1e3, note)
        prompt = prompts_for(1, args.prompt_len)[0]
        seconds = wall(lambda: list(engine.stream(prompt, settings)), repeat=3)
        table.add("FastPhiEngine.stream", 1, args.new_tokens / seconds, seconds / args.new_tokens * 1e3,
                  "tokens reach the host every step")
        facts["peak_memory"] = torch.cuda.max_memory_allocated()
        facts["cache_bytes"] = engine.cache.k.nbytes * 2

    def prefill():
        engine = engines["fast"]
        prompt = prompts_for(1, 1024)
        one = GenerationSettings(max_new_tokens=1)
        engine.generate(prompt, one)
        facts["prefill"] = wall(lambda: engine.generate(prompt, one), repeat=5)
        ids = torch.tensor(prompt, device="cuda")
        with torch.inference_mode():
            model(ids)
            facts["prefill_hf"] = wall(lambda: model(ids), repeat=5)

    def torch_attention():
        engine = FastPhiEngine(model, EOS, max_batch_size=8, use_triton=False)
        warmup(engine, (1, 8), args.prompt_len, args.new_tokens)
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        for batch in (1, 8):
            prompts = prompts_for(batch, args.prompt_len)
            engine.generate(prompts, settings)
            seconds = wall(lambda: engine.generate(prompts, settings), repeat=3)  # noqa: B023 - called now
            table.add("FastPhiEngine, SDPA over the whole cache", batch, batch * args.new_tokens / seconds,
                      seconds / args.new_tokens * 1e3, "variant: use_triton=False")

    def variant(label: str, note: str, **changes) -> None:
        """The engine again with DecodeConfig fields changed (batches on the fused path only)."""
        sizes = [b for b in batches if b >= decode_config.fused_min_rows]
        engine = FastPhiEngine(model, EOS, max_batch_size=max(sizes), config=replace(decode_config, **changes))
        warmup(engine, sizes, args.prompt_len, args.new_tokens)
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        for batch in sizes:
            prompts = prompts_for(batch, args.prompt_len)
            engine.generate(prompts, settings)
            seconds = wall(lambda: engine.generate(prompts, settings), repeat=3)  # noqa: B023
            table.add(label, batch, batch * args.new_tokens / seconds, seconds / args.new_tokens * 1e3, note)
        engine = None  # its cache and graphs go before the next part allocates
        torch.cuda.empty_cache()

    def agreement():
        engine, count, length = engines["fast"], 32, 64
        prompts = prompts_for(count, args.prompt_len, seed=1)
        theirs = hf_generate(model, prompts, length).tolist()
        ours = [g.token_ids for g in engine.generate(prompts, GenerationSettings(max_new_tokens=length))]
        same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
        prefixes = []
        for x, y in zip(ours, theirs):
            n = 0
            while n < min(len(x), len(y)) and x[n] == y[n]:
                n += 1
            prefixes.append(n)
        alone = [engine.generate([p], GenerationSettings(max_new_tokens=length))[0].token_ids
                 for p in prompts[:8]]
        streamed = list(engine.stream(prompts[0], GenerationSettings(max_new_tokens=length)))
        facts["agreement"] = (
            f"{count} prompts x {length} tokens vs model.generate (fp16, batched): "
            f"{same / (count * length):.1%} of tokens identical position by position, "
            f"{sum(n == length for n in prefixes)}/{count} rows identical throughout, "
            f"mean common prefix {statistics.mean(prefixes):.1f} tokens; "
            f"batch rows vs alone: {sum(a == b for a, b in zip(ours, alone))}/8 identical; "
            f"stream == generate: {streamed == alone[0]}")

    def profile():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        from pipeline.llm.phi_model import decode_step

        engine = engines["fast"]
        for batch in sorted({1, max(batches)}):
            engine.generate(prompts_for(batch, args.prompt_len), GenerationSettings(max_new_tokens=160))
            rows = engine.bucket(batch)
            state = engine.cache.state(rows)  # the rows as the last call left them (their blocks freed)
            state.col.fill_(190)
            step = lambda: decode_step(engine.weights, state, engine.cos, engine.sin,  # noqa: E731
                                       use_triton=engine.use_triton, attention=engine.config.attention(rows),
                                       config=engine.config)
            with torch.inference_mode():
                step()
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
            print(f"-- eager decode step, batch {batch}, 5 steps (kernel times; graphs remove the gaps)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))

    def breakdown():
        """Where a batch-128 generate call's time goes: the prefill's kernels, and the decode graph's
        replays alone against the generate loop's steps (the difference is the loop's own work)."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        engine, batch = engines["fast"], max(batches)
        prompts = prompts_for(batch, args.prompt_len)
        one = GenerationSettings(max_new_tokens=1)
        engine.generate(prompts, one)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(prompts, one)
            torch.cuda.synchronize()
        print(f"-- prefill of {batch} x {args.prompt_len} tokens (+ 1 token)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
        engine.generate(prompts, GenerationSettings(max_new_tokens=args.new_tokens))
        graph, _ = engine.cache.graphs[engine.bucket(batch)]
        state = engine.cache.state(engine.bucket(batch))
        replays = 50  # each moves the column on by one: centre them on a generate call's mean column
        state.col.fill_(args.prompt_len + (args.new_tokens - replays) // 2)
        state.positions.fill_(args.prompt_len + (args.new_tokens - replays) // 2)
        seconds = wall(lambda: [graph.replay() for _ in range(replays)])
        facts["replay"] = (batch, seconds / replays * 1e3)

    section("bandwidth floor", floor)
    if args.tune_attention:
        section("attention kernel study", tune)
    section("FastPhiEngine", fast)
    section("prefill", prefill)
    if args.profile:
        section("profile", profile)
        section("batch breakdown", breakdown)
    section("fp16 greedy agreement", agreement)
    if args.layer_variants:
        section("FastPhiEngine variant: GELU kernel of its own",
                lambda: variant("FastPhiEngine, GELU as its own kernel", "variant: gelu_in_rope=False",
                                gelu_in_rope=False))
        section("FastPhiEngine variant: unfused products",
                lambda: variant("FastPhiEngine, four products per layer", "variant: qkv, dense, fc1, fc2 unfused",
                                fused_min_rows=1 << 30))
    if not args.quick and not args.no_sdpa_variant:
        section("FastPhiEngine variant: torch attention", torch_attention)
    if not args.skip_transformers:
        section("model.generate", plain)
    if static_batches and not args.skip_transformers:
        section("static-cache generate", static)

    lines = header + ["", table.markdown(), ""]
    if "prefill" in facts:
        lines.append(f"- prefill, 1,024-token prompt, batch 1 (FastPhiEngine.generate with max_new_tokens=1): "
                     f"{facts['prefill'] * 1e3:.1f} ms (model forward: {facts['prefill_hf'] * 1e3:.1f} ms)")
    if "startup" in facts:
        lines.append(f"- start-up: {facts['startup']:.1f} s (engine + warmup for batches {batches}; "
                     f"warmup alone {facts['warmup']:.1f} s)")
        lines.append(f"- peak GPU memory during the engine runs: {facts['peak_memory'] / 2**30:.1f} GiB "
                     f"(weights {weight_bytes / 2**30:.1f} GiB, KV cache {facts['cache_bytes'] / 2**30:.1f} GiB)")
    if "replay" in facts:
        lines.append(f"- the decode graph alone at batch {facts['replay'][0]}, cache at the run's mean column: "
                     f"{facts['replay'][1]:.2f} ms per replay")
    if "agreement" in facts:
        lines.append(f"- agreement: {facts['agreement']}")
    if "tuned" in facts:
        lines.append("- attention kernels chosen by --tune-attention: "
                     + "; ".join(f"batch {r}: {c}" for r, c in facts["tuned"].items()))
    report = "\n".join(lines)
    print("\n" + report)
    target = args.out or (os.path.join(os.environ["OUT"], "llm_decode.md") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(report + "\n")


if __name__ == "__main__":
    main()
