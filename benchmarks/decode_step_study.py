"""One phi-2 decode step, taken apart: variants of the layer and of its matrix products, timed on the GPU.

Builds phi-2 at the published shape with random fp16 weights, fills a KV cache of --length columns
per row with random values, and times one decode step captured as a CUDA graph (median of many
replays) for each variant of the engine's DecodeConfig, at each batch size. It also times the step's
parts alone (the two matrix products of a layer through cuBLAS, transposed or not, and a plain Triton
GEMM for 128 rows), so a change to the step can be judged before it goes into the engine.

    PYTHONPATH=. python benchmarks/decode_step_study.py --batches 32,128 --length 160

Logits of each variant are compared with the one-stream step's (relative error), so a variant that
is fast but wrong shows. Results go to stdout and, when OUT is set, to $OUT/decode_step_study.txt.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F


from llm_decode import EOS, build_model
from llm_decode import graph_ms as replay_ms

from pipeline.kernels.phi_attention import AttentionConfig, triton_attention
from pipeline.llm.decode_config import DEFAULT_DECODE
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.llm.phi_model import DecodeState, decode_step

LINES: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    LINES.append(text)


def graph_ms(fn, replays: int = 30) -> float:
    """Median milliseconds of one replay of fn captured in a CUDA graph (warmed up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    return replay_ms(fn, replays)


def step_variants(engine, rows: int, length: int, variants: dict[str, dict]) -> None:
    """Each variant's whole decode step at `rows` rows over `length` cached columns; a variant is a
    dict of DecodeConfig fields to change."""
    long = dict(dtype=torch.long, device="cuda")
    state = DecodeState(torch.randint(0, 50000, (rows,), **long), torch.full((rows,), length - 1, **long),
                        torch.tensor([length - 1], **long), torch.zeros(rows, **long),
                        engine._k_cache[:, :rows], engine._v_cache[:, :rows])
    w = engine.weights
    reference = None
    for name, changes in variants.items():
        config = replace(engine.config, **changes)
        try:
            step = lambda: decode_step(w, state, engine.cos, engine.sin, use_triton=True, config=config)  # noqa: E731,B023
            logits = step().float()
            if reference is None:
                reference = logits
            error = ((logits - reference).norm() / reference.norm()).item()
            same = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            ms = graph_ms(step)
            again = graph_ms(step)
            say(f"step b{rows} len {length} {name:28s} {ms:6.3f} ms (again {again:6.3f})  "
                f"{rows / ms * 1e3:8,.0f} tok/s  err {error:.1e} argmax same {same:.1%}")
        except Exception as exc:  # noqa: BLE001 - report and go on
            say(f"step b{rows} {name}: failed {type(exc).__name__}: {str(exc)[:200]}")


def attention_variants(engine, rows: int, length: int):
    """Decode attention (rope + cache write + attention) over 32 layers: the engine's kernel for this
    batch size as two kernels and as one, then the one-kernel form at other tiles; returns the fastest."""
    from llm_decode import AttentionBench

    bench = AttentionBench(engine, rows, length)
    bench.ref = bench.reference()
    kv_bytes = 2 * rows * engine.weights.heads * length * engine.weights.head_dim * 2
    now = engine.config.attention(rows)
    candidates = [(now, False), (now, True)]
    candidates += [(AttentionConfig("dot", n, warps, stages, 1, True), True) for n in (16, 32, 64)
                   for warps in (1, 2, 4) for stages in (2, 3, 4)]
    results = []
    for config, fused in candidates:
        try:
            us, error = bench.time(config, rope_inside=fused)
        except Exception as exc:  # noqa: BLE001
            say(f"attn b{rows} {config}: failed {type(exc).__name__}: {str(exc)[:160]}")
            continue
        results.append((us, error, config, fused))
        say(f"attn b{rows} len {length} {us:6.1f} us/layer {kv_bytes / us / 1e6:5.2f} TB/s err {error:.1e} "
            f"{'one kernel ' if fused else 'two kernels'} {config}")
    good = sorted((r for r in results if r[1] < 2e-3 and r[3]), key=lambda r: r[0])
    say(f"attn b{rows} best: {good[0][2]} {good[0][0]:.1f} us/layer (engine's tiles now: two kernels "
        f"{results[0][0]:.1f}, one kernel {results[1][0]:.1f})")
    del bench
    return good[0][2]


def padded_gemms(rows: int, copies: int = 8) -> None:
    """The layer's products and the LM head at `rows` rows with their weights padded by zero rows or
    columns: cuBLAS chooses its tiles (and so how evenly they fill the SMs) by shape. Times one call
    (median over `copies` weight tensors in turn, so nothing stays in L2), against the unpadded one."""
    half = torch.float16
    cases = {  # name: (out features N, in features K, the unpadded N, K)
        "in  [q k v fc1]": (17920, 2560), "out [dense fc2]": (2560, 12800), "lm head": (51200, 2560),
    }
    for name, (n, k) in cases.items():
        base = None
        pads = [(dn, 0) for dn in (0, 32, 64, 128, 256, 512, 1024, 2048)] + [(0, dk) for dk in (64, 256, 1024)]
        for dn, dk in pads:
            weights = [torch.randn(n + dn, k + dk, device="cuda", dtype=half) for _ in range(copies)]
            bias = torch.randn(n + dn, device="cuda", dtype=half)
            x = torch.randn(rows, k + dk, device="cuda", dtype=half)
            ms = graph_ms(lambda: [torch.addmm(bias, x, w.t()) for w in weights]) / copies  # noqa: B023
            base = base or ms
            say(f"padded {name} N {n}+{dn} K {k}+{dk}: {ms * 1e3:6.1f} us ({base / ms:5.3f}x the unpadded), "
                f"{n * k * 2 / ms / 1e9:5.2f} TB/s of the real weights")
            weights = None  # freed before the next shape is allocated
        torch.cuda.empty_cache()


def small_kernel_warps(model, engine, batches: list[int], length: int) -> None:
    """Warps for the small kernels: the layer norm (whole decode steps) and the rotary (the prefill)."""
    from llm_decode import prompts_for, wall

    from pipeline.spec import GenerationSettings

    for rows in batches:
        step_variants(engine, rows, length, {f"layer norm, {n} warps": {"norm_warps": n} for n in (1, 2, 4, 8, 16)})
    engine._k_cache = engine._v_cache = None
    torch.cuda.empty_cache()
    one = GenerationSettings(max_new_tokens=1)
    for warps in (1, 2, 4):
        variant = FastPhiEngine(model, EOS, max_batch_size=max(batches), use_graphs=False,
                                config=replace(engine.config, rope_warps=warps))
        for rows in batches:
            prompts = prompts_for(rows, 32)
            variant.generate(prompts, one)
            ms = wall(lambda: variant.generate(prompts, one), repeat=5) * 1e3  # noqa: B023
            say(f"prefill b{rows} x 32 tokens, rotary kernel {warps} warps: {ms:.1f} ms")
        variant = None
        torch.cuda.empty_cache()


def one_layer(engine, batches: list[int], length: int) -> None:
    """Layer 0's attention and its two products, once per batch size, for a profiler to read."""
    from llm_decode import AttentionBench

    layer = engine.weights.layers[0]
    for rows in batches:
        bench = AttentionBench(engine, rows, length)
        e = engine
        triton_attention(bench.qkv, bench.state, bench.k[0], bench.v[0], e.cos, e.sin, e.weights,
                         e.config.attention(rows), pdl=e.config.pdl)
        x = torch.randn(rows, layer.in_w.shape[1], device="cuda", dtype=torch.float16)
        mixed = torch.randn(rows, layer.out_w.shape[1], device="cuda", dtype=torch.float16)
        torch.addmm(layer.in_b, x, layer.in_w.t())
        torch.addmm(layer.out_b, mixed, layer.out_w.t())
        torch.cuda.synchronize()
        say(f"profiled b{rows}")


def gemm_parts(engine, rows: int) -> None:
    """A layer's products at `rows` rows through cuBLAS (as written, transposed, Lt) over all 32 layers."""
    w = engine.weights
    x = torch.randn(rows, w.layers[0].in_w.shape[1], device="cuda", dtype=torch.float16)
    mixed = torch.randn(rows, w.layers[0].out_w.shape[1], device="cuda", dtype=torch.float16)
    h = torch.randn(rows, w.layers[0].hidden, device="cuda", dtype=torch.float16)
    in_bytes = sum(layer.in_w.nbytes for layer in w.layers)
    out_bytes = sum(layer.out_w.nbytes for layer in w.layers)
    cases = {
        "in  addmm(b, x, W.T)": (lambda: [torch.addmm(l.in_b, x, l.in_w.t()) for l in w.layers], in_bytes),
        "in  mm(W, x.T) (transposed)": (lambda: [torch.mm(l.in_w, x.t()) for l in w.layers], in_bytes),
        "out h.addmm_(m, W.T)": (lambda: [h.addmm_(mixed, l.out_w.t()) for l in w.layers], out_bytes),
        "out mm(W, m.T) (transposed)": (lambda: [torch.mm(l.out_w, mixed.t()) for l in w.layers], out_bytes),
        "out addmm(b, m, W.T) (bias)": (lambda: [torch.addmm(l.out_b, mixed, l.out_w.t()) for l in w.layers],
                                        out_bytes),
        "qkv addmm": (lambda: [torch.addmm(l.qkv_b, x, l.qkv_w.t()) for l in w.layers],
                      sum(l.qkv_w.nbytes for l in w.layers)),
        "fc1 addmm": (lambda: [torch.addmm(l.fc1_b, x, l.fc1_w.t()) for l in w.layers],
                      sum(l.fc1_w.nbytes for l in w.layers)),
        "fc2 addmm (strided W)": (lambda: [torch.addmm(h, mixed[:, l.hidden:], l.fc2_w.t()) for l in w.layers],
                                  sum(l.fc2_w.numel() * 2 for l in w.layers)),
        "dense addmm (strided W)": (lambda: [torch.addmm(h, mixed[:, :l.hidden], l.dense_w.t()) for l in w.layers],
                                    sum(l.dense_w.numel() * 2 for l in w.layers)),
    }
    y = torch.empty(rows, w.layers[0].in_w.shape[0], device="cuda", dtype=torch.float16)
    for cuts in ([16896], [8448, 16896], [8960], [12800], [1024]):  # column blocks of the in product
        bounds = list(zip([0] + cuts, cuts + [y.shape[1]]))

        def blocks(bounds=bounds):
            for layer in w.layers:
                for a, b in bounds:
                    torch.addmm(layer.in_b[a:b], x, layer.in_w[a:b].t(), out=y[:, a:b])

        cases[f"in  in blocks {bounds}"] = (blocks, in_bytes)
    for backend in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(backend)
        except Exception as exc:  # noqa: BLE001
            say(f"blas {backend}: unavailable ({exc})")
            continue
        for name, (fn, nbytes) in cases.items():
            ms = graph_ms(fn)
            say(f"gemm b{rows} {backend:8s} {name:30s} {ms / 32 * 1e3:6.1f} us/layer "
                f"{nbytes / ms / 1e9:5.2f} TB/s")
    torch.backends.cuda.preferred_blas_library("cublas")


def tma_gemm(engine, rows: int) -> None:
    """A persistent Triton GEMM with TMA loads, y = x @ W.T (+ bias), for the layer's two products at
    `rows` rows; the out product also split along K into fp32 partials (what a layer norm could sum)."""
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def kernel(x_desc, w_desc, y_desc, bias_ptr, N, K, n_programs, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr):
        n_tiles = N // BLOCK_N
        k_chunk = K // SPLIT
        for unit in range(tl.program_id(0), n_tiles * SPLIT, n_programs):
            tile = unit % n_tiles
            split = unit // n_tiles
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in tl.range(split * k_chunk, (split + 1) * k_chunk, BLOCK_K, num_stages=STAGES):
                a = x_desc.load([0, k])
                b = w_desc.load([tile * BLOCK_N, k])
                acc = tl.dot(a, b.T, acc)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + tile * BLOCK_N + tl.arange(0, BLOCK_N))[None, :].to(tl.float32)
            y_desc.store([split * BLOCK_M, tile * BLOCK_N], acc.to(y_desc.dtype))

    def alloc(size, alignment, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)
    w = engine.weights
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name in ("in", "out"):
        weights = [layer.in_w if name == "in" else layer.out_w for layer in w.layers]
        biases = [layer.in_b if name == "in" else layer.out_b for layer in w.layers]
        n_out, k_in = weights[0].shape
        x = torch.randn(rows, k_in, device="cuda", dtype=torch.float16)
        nbytes = sum(t.nbytes for t in weights)
        want = torch.addmm(biases[0], x, weights[0].t()).float()
        for split in ((1,) if name == "in" else (1, 2, 4, 5, 8)):
            for bn, bk, stages, warps in [(64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 4, 4), (128, 64, 4, 8),
                                          (128, 128, 3, 8), (256, 64, 3, 8), (64, 64, 6, 4), (128, 64, 6, 8)]:
                if n_out % bn or k_in % (bk * split):
                    continue
                units = n_out // bn * split
                for persistent in (True, False):
                    programs = min(units, sms) if persistent else units
                    dtype = torch.float16 if split == 1 else torch.float32
                    y = torch.zeros(rows * split, n_out, device="cuda", dtype=dtype)
                    x_desc = TensorDescriptor.from_tensor(x, [rows, bk])
                    y_desc = TensorDescriptor.from_tensor(y, [rows, bn])
                    descs = [TensorDescriptor.from_tensor(t, [bn, bk]) for t in weights]

                    def run(i, y_desc=y_desc, descs=descs, bn=bn, bk=bk, stages=stages, warps=warps, split=split,
                            programs=programs):
                        kernel[(programs,)](x_desc, descs[i], y_desc, biases[i], n_out, k_in, programs,
                                            SPLIT=split, BLOCK_M=rows, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
                                            HAS_BIAS=split == 1, num_warps=warps)

                    label = f"tma {name} b{rows} split {split} tile {bn}x{bk} s{stages} w{warps} " \
                            f"{'persistent' if persistent else 'grid'}"
                    try:
                        run(0)
                        got = y.float().view(split, rows, n_out).sum(0)
                        if split > 1:
                            got += biases[0].float()
                        error = ((got - want).norm() / want.norm()).item()
                        ms = graph_ms(lambda: [run(i) for i in range(len(weights))])  # noqa: B023
                        say(f"{label}: {ms / 32 * 1e3:6.1f} us/layer {nbytes / ms / 1e9:5.2f} TB/s err {error:.1e}")
                    except Exception as exc:  # noqa: BLE001
                        say(f"{label}: failed {type(exc).__name__}: {str(exc)[:160]}")


def cache_strides(rows: int, length: int, columns: list[int], layers: int = 8) -> None:
    """The attention kernel over caches of several allocated lengths (the stride between heads), with
    keys and values in two tensors or interleaved in one ([..., columns, 2, head_dim]: a tile of keys
    and its values are then one contiguous block)."""
    from types import SimpleNamespace

    from pipeline.llm.phi_weights import rope_tables

    heads, head_dim = 32, 80
    w = SimpleNamespace(heads=heads, head_dim=head_dim, rotary_dim=32, rope_theta=10000.0,
                        device=torch.device("cuda"), dtype=torch.float16)
    cos, sin = rope_tables(w, 2048)
    long = dict(dtype=torch.long, device="cuda")
    qkv = torch.randn(rows, 3 * heads * head_dim, device="cuda", dtype=torch.float16)
    nbytes = 2 * rows * heads * length * head_dim * 2 * layers
    for cols in columns:
        for interleaved in (False, True):
            if interleaved:
                kv = torch.randn(layers, rows, heads, cols, 2, head_dim, device="cuda", dtype=torch.float16)
                k, v = kv[..., 0, :], kv[..., 1, :]
            else:
                k = torch.randn(layers, rows, heads, cols, head_dim, device="cuda", dtype=torch.float16)
                v = torch.randn_like(k)
            state = DecodeState(torch.zeros(rows, **long), torch.full((rows,), length - 1, **long),
                                torch.tensor([length - 1], **long), torch.zeros(rows, **long), k, v)
            config = DEFAULT_DECODE.attention(rows)
            ms = graph_ms(lambda: [triton_attention(qkv, state, k[i], v[i], cos, sin, w, config,  # noqa: B023
                                                    pdl=DEFAULT_DECODE.pdl) for i in range(layers)])
            say(f"cache b{rows} columns allocated {cols:5d} {'interleaved' if interleaved else 'two tensors'}: "
                f"{ms / layers * 1e3:6.1f} us/layer {nbytes / ms / 1e9:5.2f} TB/s")
            k = v = state = kv = None  # freed before the next length is allocated
            torch.cuda.empty_cache()


def lt_algos(engine, batches: list[int], count: int = 24) -> None:
    """Each product of a layer (and the LM head) through every algorithm cuBLASLt's heuristic lists,
    over all 32 layers' weights, against torch.addmm (the heuristic's first pick)."""
    from lt_matmul import LtLinear

    w = engine.weights
    products = {  # weights, biases, GELU epilogue, accumulate into a tensor (dense: C = the MLP's part)
        "qkv": ([l.qkv_w for l in w.layers], [l.qkv_b for l in w.layers], False, False),
        "fc1+gelu": ([l.fc1_w for l in w.layers], [l.fc1_b for l in w.layers], True, False),
        "fc2": ([l.fc2_w for l in w.layers], [l.out_b for l in w.layers], False, False),
        "dense+C": ([l.dense_w for l in w.layers], [None for l in w.layers], False, True),
        "in": ([l.in_w for l in w.layers], [l.in_b for l in w.layers], False, False),
        "out": ([l.out_w for l in w.layers], [l.out_b for l in w.layers], False, False),
        "lm": ([w.lm_w] * 4, [w.lm_b] * 4, False, False),
    }
    for rows in batches:
        for name, (weights, biases, gelu, accumulate) in products.items():
            x = torch.randn(rows, weights[0].shape[1], device="cuda", dtype=torch.float16)
            c = torch.randn(rows, weights[0].shape[0], device="cuda", dtype=torch.float16)
            nbytes = sum(t.numel() * 2 for t in weights)

            def torch_product(t, b):
                if accumulate:  # noqa: B023
                    return torch.addmm(c, x, t.t())  # noqa: B023
                if gelu:  # noqa: B023
                    return torch._addmm_activation(b, x, t.t(), use_gelu=True)  # noqa: B023
                return torch.addmm(b, x, t.t())  # noqa: B023

            base = graph_ms(lambda: [torch_product(t, b) for t, b in zip(weights, biases)])  # noqa: B023
            say(f"lt {name} b{rows} torch: {base / len(weights) * 1e3:6.1f} us/product "
                f"{nbytes / base / 1e9:5.2f} TB/s")
            want = torch_product(weights[0], biases[0]).float()
            linears = [LtLinear(t, b, rows, gelu=gelu, accumulate=accumulate) for t, b in zip(weights, biases)]
            for index, heuristic in enumerate(linears[0].candidates(count)):
                info = linears[0].describe(index, heuristic)
                for lin in linears:
                    lin.use(heuristic)
                try:
                    got = linears[0](x, c=c if accumulate else None).float()  # noqa: B023
                    error = ((got - want).norm() / want.norm()).item()
                    ms = graph_ms(lambda: [lin(x, c=c if accumulate else None) for lin in linears])  # noqa: B023
                    say(f"lt {name} b{rows} {info}: {ms / len(weights) * 1e3:6.1f} us/product "
                        f"{nbytes / ms / 1e9:5.2f} TB/s ({base / ms:5.3f}x addmm) err {error:.1e}")
                except Exception as exc:  # noqa: BLE001
                    say(f"lt {name} b{rows} {info}: failed {type(exc).__name__}: {str(exc)[:160]}")


def overlap(engine, rows: int, length: int, carveouts: list[int]) -> None:
    """A layer's attention beside its MLP on a second stream, the MLP's products on fewer SMs.

    phi-2's MLP reads the layer norm's output, not attention's, so fc1 (with its GELU as cuBLASLt's
    epilogue) and fc2 can run while attention reads the cache; dense then adds attention's share.
    Timed over all 32 layers (their own weights and cache) against the fused one-stream layer. The
    engine's form is "split, attention launched first" on all SMs (phi_model._layer_mlp_beside);
    `carveouts` lists SM counts for the side stream's products (torch's SM carve-out for cuBLASLt)."""
    w, e = engine.weights, engine
    long = dict(dtype=torch.long, device="cuda")
    state = DecodeState(torch.zeros(rows, **long), torch.full((rows,), length - 1, **long),
                        torch.tensor([length - 1], **long), torch.zeros(rows, **long),
                        engine._k_cache[:, :rows], engine._v_cache[:, :rows])
    config = engine.config.attention(rows)
    pdl = engine.config.pdl
    hidden = w.layers[0].hidden
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16)
    outs: list[torch.Tensor] = [None] * len(w.layers)

    def fused():
        for i, layer in enumerate(w.layers):
            y = torch.addmm(layer.in_b, x, layer.in_w.t())
            mixed = torch.empty((rows, layer.out_w.shape[1]), dtype=x.dtype, device=x.device)
            triton_attention(y[:, :3 * hidden], state, state.k_cache[i], state.v_cache[i], e.cos, e.sin, w, config,
                             mixed[:, :hidden], (y[:, 3 * hidden:], mixed[:, hidden:]), pdl=pdl)
            outs[i] = torch.addmm(layer.out_b, mixed, layer.out_w.t())

    side = torch.cuda.Stream()

    def mlp(layer, carveout):
        if carveout:
            torch._C._set_sm_carveout_experimental(carveout)
        up = torch._addmm_activation(layer.fc1_b, x, layer.fc1_w.t(), use_gelu=True)
        part = torch.addmm(layer.out_b, up, layer.fc2_w.t())
        if carveout:
            torch._C._set_sm_carveout_experimental(None)
        return part

    def split(carveout=0, streams=True, mlp_first=True):
        main = torch.cuda.current_stream()
        for i, layer in enumerate(w.layers):
            if streams:
                side.wait_stream(main)
            def attention():
                qkv = torch.addmm(layer.qkv_b, x, layer.qkv_w.t())  # noqa: B023
                return triton_attention(qkv, state, state.k_cache[i], state.v_cache[i], e.cos, e.sin, w,  # noqa: B023
                                        config, pdl=pdl)
            if mlp_first:
                with torch.cuda.stream(side if streams else main):
                    part = mlp(layer, carveout)
                attn = attention()
            else:
                attn = attention()
                with torch.cuda.stream(side if streams else main):
                    part = mlp(layer, carveout)
            if streams:
                main.wait_stream(side)
            outs[i] = torch.addmm(part, attn, layer.dense_w.t())

    def hybrid(carveout=0, attention_first=True):
        """[q k v fc1] in one product as now; GELU and fc2 on the side stream beside attention."""
        main = torch.cuda.current_stream()
        for i, layer in enumerate(w.layers):
            y = torch.addmm(layer.in_b, x, layer.in_w.t())
            side.wait_stream(main)

            def mlp_part():
                if carveout:
                    torch._C._set_sm_carveout_experimental(carveout)
                up = F.gelu(y[:, 3 * hidden:], approximate="tanh")  # noqa: B023
                part = torch.addmm(layer.out_b, up, layer.fc2_w.t())  # noqa: B023
                if carveout:
                    torch._C._set_sm_carveout_experimental(None)
                return part

            if not attention_first:
                with torch.cuda.stream(side):
                    part = mlp_part()
            attn = triton_attention(y[:, :3 * hidden], state, state.k_cache[i], state.v_cache[i], e.cos, e.sin, w,
                                    config, pdl=pdl)
            if attention_first:
                with torch.cuda.stream(side):
                    part = mlp_part()
            main.wait_stream(side)
            outs[i] = torch.addmm(part, attn, layer.dense_w.t())

    fused()
    reference = [o.float() for o in outs]
    variants = {"fused, one stream": fused, "split, one stream": lambda: split(streams=False)}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for g in carveouts:
        variants[f"hybrid, attention first, MLP on {g} SMs"] = lambda g=g: hybrid(sms - g)
        variants[f"split, MLP launched first, MLP on {g} SMs"] = lambda g=g: split(sms - g)
        variants[f"split, attention launched first, MLP on {g} SMs"] = lambda g=g: split(sms - g, mlp_first=False)
    for name, fn in variants.items():
        try:
            fn()
            torch.cuda.synchronize()
            error = max(((o.float() - r).norm() / r.norm()).item() for o, r in zip(outs, reference))
            ms = graph_ms(fn)
            again = graph_ms(fn)
            say(f"overlap b{rows} len {length} {name:45s} {ms / 32 * 1e3:6.1f} us/layer "
                f"(again {again / 32 * 1e3:6.1f}) err {error:.1e}")
        except Exception as exc:  # noqa: BLE001
            say(f"overlap b{rows} {name}: failed {type(exc).__name__}: {str(exc)[:200]}")
    # the MLP's products alone, to see the carve-out take effect
    for g in carveouts:
        ms = graph_ms(lambda g=g: [mlp(layer, sms - g) for layer in w.layers])
        say(f"overlap b{rows} MLP products alone on {g} SMs: {ms / 32 * 1e3:6.1f} us/layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--length", type=int, default=160, help="cached columns per row (mean of a 32+256 run)")
    parser.add_argument("--skip-gemm", action="store_true", help="skip the cuBLAS products timed alone")
    parser.add_argument("--tma-gemm", action="store_true", help="also time a persistent Triton TMA GEMM")
    parser.add_argument("--no-tiles", action="store_true", help="skip the attention tile search before the steps")
    parser.add_argument("--skip-steps", action="store_true", help="skip the attention and whole-step variants")
    parser.add_argument("--cache-columns", default="", help="also time attention over caches this long")
    parser.add_argument("--padded-gemms", action="store_true",
                        help="only the products at 128 rows with zero-padded weights (cuBLAS picks tiles by shape)")
    parser.add_argument("--lt-algos", action="store_true",
                        help="only the products through each algorithm cuBLASLt's heuristic lists")
    parser.add_argument("--overlap", default="",
                        help="only attention beside the MLP on a second stream, the MLP's products on these many SMs")
    parser.add_argument("--warps", action="store_true",
                        help="only the layer norm's and the rotary kernel's warps: steps and the batch's prefill")
    parser.add_argument("--profile-once", action="store_true",
                        help="run one layer's attention and products once per batch size (a target for ncu)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    say(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}; command: {' '.join(sys.argv)}")
    model = build_model()
    engine = FastPhiEngine(model, EOS, max_batch_size=max(batches), use_graphs=False)
    engine._ensure_cache(max(batches), args.length + 32)
    engine._k_cache.normal_()
    engine._v_cache.normal_()
    with torch.inference_mode():
        if args.profile_once:
            one_layer(engine, batches, args.length)
            return
        if args.padded_gemms:
            padded_gemms(max(batches))
            return
        if args.overlap:
            for rows in batches:
                overlap(engine, rows, args.length, [int(c) for c in args.overlap.split(",")])
            return
        if args.lt_algos:
            lt_algos(engine, batches)
            return
        if args.warps:
            small_kernel_warps(model, engine, batches, args.length)
            return
        for rows in [] if args.skip_steps else batches:
            tiles = engine.config.attention(rows)
            best = tiles if args.no_tiles else attention_variants(engine, rows, args.length)
            tuned = dict(engine.config.attention_tiles)
            tuned[min((b for b in tuned if b >= rows), default=max(tuned))] = best
            variants = {
                "fused layer": {"mlp_beside_attention": False},
                "MLP beside attention": {"mlp_beside_attention": True},
                "MLP beside, no PDL": {"mlp_beside_attention": True, "pdl": False},
                "fused layer (again)": {"mlp_beside_attention": False},
                "MLP beside (again)": {"mlp_beside_attention": True},
                "MLP beside, + best attention tiles": {"attention_tiles": tuple(sorted(tuned.items())),
                                                       "mlp_beside_attention": True},
            }
            step_variants(engine, rows, args.length, variants)
        gemm_rows = max(batches)
        if not args.skip_gemm:
            gemm_parts(engine, gemm_rows)
        if args.tma_gemm:
            tma_gemm(engine, gemm_rows)
        if args.cache_columns:
            engine._k_cache = engine._v_cache = None
            torch.cuda.empty_cache()
            for rows in batches:
                cache_strides(rows, args.length, [int(c) for c in args.cache_columns.split(",")])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "decode_step_study.txt").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
