"""Translation speed at the published opus-mt-ja-en shape, every backend that can run here.

    PYTHONPATH=. python benchmarks/translate_speed.py [--device cuda] [--quick]

The model is MarianMTModel with the published config (d_model 512, 6+6 layers, vocab 60716) and
random weights: its <pad> embedding row is zero as in the published checkpoints, and its
final_logits_bias gives </s> -1e4, so no backend ends a row early: each of 40-token sources
(39 random ids + </s>) comes back as exactly 40 target tokens (max_new_tokens=40; the table's
"out" column checks it). generate runs 41 decoder steps for that (TransformersMTBackend asks for
one more and generate forces </s> into it); fast greedy and CTranslate2 run 40, fast beam 41.

Rows: sentences per second (the batch over the median wall time of a call, after a warm-up call
that captures graphs or compiles) and milliseconds per call. A second table gives token agreement
on a fixed set of 64 sentences, with weights of std 0.1 (--spread-std) so that output depends on
the input: CTranslate2 int8 vs float32 on the CPU, fast vs generate on CUDA. (At std 0.3, as the
tiny test checkpoints have, a few sentences are ill-conditioned at this width: generate in
float32 and float64 disagree on them.) Random weights have smaller logit margins than trained
ones, so int8 agreement here is a pessimistic figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from pipeline.checkpoints import PUBLISHED
from pipeline.mt.fast_marian import FastMarianBackend
from pipeline.mt.backends import TransformersMTBackend
from pipeline.mt.contract import strip_special

CONFIG = PUBLISHED / "Helsinki-NLP--opus-mt-ja-en" / "config.json"
SOURCE_TOKENS, TARGET_TOKENS = 40, 40


def published_model(spread: bool, seed: int = 0, std: float = 0.1):
    from transformers import MarianConfig, MarianMTModel

    config = json.loads(CONFIG.read_text())
    for key in ("_name_or_path", "architectures"):
        config.pop(key, None)
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**config)).eval()
    with torch.no_grad():
        if spread:   # as pipeline/checkpoints.py does (std 0.3 there): output depends on the input
            for name, weight in model.named_parameters():
                if weight.dim() == 2 and "embed_positions" not in name:
                    weight.normal_(0, std)
        else:
            model.final_logits_bias[0, config["eos_token_id"]] = -1e4   # every row runs to the bound
        model.get_input_embeddings().weight[config["pad_token_id"]].zero_()
    for key in ("bad_words_ids", "decoder_start_token_id", "eos_token_id", "forced_eos_token_id",
                "max_length", "num_beams", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, config[key])
    return model


def save_with_vocab(model, directory: Path) -> Path:
    """A loadable checkpoint directory (for CTranslate2's converter): the model, and a Marian
    tokenizer whose vocab.json covers all 60716 ids (the tiny checkpoint's pieces, then fillers)."""
    from pipeline.checkpoints import build_tiny_marian

    tiny = build_tiny_marian(directory / "tiny", "ja", "en")
    pieces = list(json.loads((tiny / "vocab.json").read_text(encoding="utf-8")))[:-1]   # no <pad>
    vocab_size = model.config.vocab_size
    pieces += [f"▁w{i}" for i in range(vocab_size - 1 - len(pieces))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    vocab["<pad>"] = vocab_size - 1
    path = directory / "published-ja-en"
    model.save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    from transformers import MarianTokenizer

    for name in ("source.spm", "target.spm"):
        shutil.copy(tiny / name, path / name)
    MarianTokenizer(source_spm=str(path / "source.spm"), target_spm=str(path / "target.spm"),
                    vocab=str(path / "vocab.json"), source_lang="ja", target_lang="en").save_pretrained(path)
    return path


def sources(count: int, vocab_size: int, seed: int = 1, length: int | None = SOURCE_TOKENS) -> list[list[int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = length or rng.randrange(5, SOURCE_TOKENS + 1)
        rows.append([rng.randrange(2, vocab_size - 1) for _ in range(n - 1)] + [0])
    return rows


class StaticCacheBackend(TransformersMTBackend):
    """generate(cache_implementation="static"): transformers compiles its decode step on CUDA."""

    name = "generate static"

    @torch.inference_mode()
    def generate(self, batch, max_new_tokens, num_beams):
        ids = torch.tensor(batch, device=self.model.device)   # equal lengths here: no padding
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens + 1, num_beams=num_beams, do_sample=False,
                                  max_length=None, early_stopping=num_beams > 1,
                                  cache_implementation="static")
        return [strip_special(row[1:], self.eos_token_id, self.pad_token_id, max_new_tokens)
                for row in out.tolist()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(backend, rows, beams, device, budget_s: float, max_reps: int, warm: bool):
    """(median seconds per call, shortest and longest output, reps, warm-up seconds)."""
    started = time.perf_counter()
    if warm:
        backend.generate(rows, TARGET_TOKENS, beams)
        sync(device)
    warm_s = time.perf_counter() - started
    times, out = [], None
    while len(times) < max_reps and (not times or sum(times) < budget_s):
        sync(device)
        start = time.perf_counter()
        out = backend.generate(rows, TARGET_TOKENS, beams)
        sync(device)
        times.append(time.perf_counter() - start)
    lengths = [len(r) for r in out]
    return statistics.median(times), min(lengths), max(lengths), len(times), warm_s


def speed_table(backends, device, batches, beam_options, budget_s, skip, log, cap_s) -> list[dict]:
    """Every (backend, beams, batch) not skipped; a backend past cap_s seconds (compiling, say)
    gets no further rows."""
    vocab = 60716
    table = []
    for name, backend, warm in backends:
        backend_started = time.perf_counter()
        for beams in beam_options:
            for batch in batches:
                if (name, beams, batch) in skip:
                    continue
                if time.perf_counter() - backend_started > cap_s:
                    log(f"{name} beams={beams} batch={batch}: skipped, backend past its {cap_s:.0f}s cap")
                    table.append(dict(backend=name, beams=beams, batch=batch, error=f"not run: {cap_s:.0f}s cap"))
                    continue
                rows = sources(batch, vocab, seed=batch)
                started = time.perf_counter()
                try:
                    seconds, shortest, longest, reps, warm_s = time_calls(
                        backend, rows, beams, device, budget_s, 20 if batch == 1 else 5, warm)
                except Exception as error:   # a backend that fails here is reported, not fatal
                    log(f"{name} beams={beams} batch={batch}: FAILED {type(error).__name__}: {error}")
                    table.append(dict(backend=name, beams=beams, batch=batch, error=str(error)[:80]))
                    continue
                row = dict(backend=name, beams=beams, batch=batch, sent_s=batch / seconds,
                           ms=seconds * 1000, out=f"{shortest}-{longest}", reps=reps,
                           warm_s=warm_s, total_s=time.perf_counter() - started)
                log(json.dumps(row))
                table.append(row)
    return table


def agreement(reference, candidate, rows, beams) -> str:
    a = reference.generate(rows, TARGET_TOKENS, beams)
    b = candidate.generate(rows, TARGET_TOKENS, beams)
    same = sum(x == y for x, y in zip(a, b))
    tokens = sum(len(x) for x in a)
    matching = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                   for x, y in zip(a, b))
    return f"{same}/{len(a)} sentences identical, {matching}/{tokens} reference tokens before the first difference"


def print_table(table, header, command, device_name) -> None:
    print(f"\n## translate_speed: {header}")
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device {device_name}; "
          f"torch {torch.__version__}; transformers {__import__('transformers').__version__}; "
          f"ctranslate2 {ctranslate2_version()}; python {platform.python_version()}")
    print(f"command: {command}\n")
    print("| backend | beams | batch | sentences/s | ms per call | out tokens | reps | warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        if "error" in r:
            print(f"| {r['backend']} | {r['beams']} | {r['batch']} | {r['error']} | | | | |")
        else:
            print(f"| {r['backend']} | {r['beams']} | {r['batch']} | {r['sent_s']:,.1f} | {r['ms']:,.1f} | "
                  f"{r['out']} | {r['reps']} | {r['warm_s']:.1f} |")


def ctranslate2_version() -> str:
    try:
        import ctranslate2
        return ctranslate2.__version__
    except ImportError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per row, at least one")
    parser.add_argument("--static-batches", default="1,64,256", help="batches for the static-cache path")
    parser.add_argument("--static-beams", default="1")
    parser.add_argument("--generate-beams", default="1,4", help="beams for generate's rows")
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--agreement-only", action="store_true")
    parser.add_argument("--spread-std", type=float, default=0.1, help="weight std of the agreement model")
    parser.add_argument("--attention-variants", default="",
                        help="CUDA: also time the fast path with these attention modes (efficient,math)")
    parser.add_argument("--kernel-variants", default="",
                        help="CUDA: also time the fast path with these Triton kernel sets, ';'-separated "
                             "(e.g. 'none;norm,top'; the default runs all of attention,norm,top)")
    parser.add_argument("--agreement-variants", default="",
                        help="CUDA: also check these kernel sets' agreement with generate, ';'-separated")
    parser.add_argument("--profile", action="store_true", help="CUDA: the fast path's top kernels, batch 1 and 256")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, torch and CTranslate2 (0: default)")
    parser.add_argument("--cap", type=float, default=240, help="seconds after which a backend gets no more rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "PYTHONPATH=. python benchmarks/translate_speed.py " + " ".join(sys.argv[1:])
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    batches = [int(b) for b in args.batches.split(",")]
    beam_options = [int(b) for b in args.beams.split(",")]
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    model = published_model(spread=False).to(device, dtype)
    static_batches = {int(b) for b in args.static_batches.split(",") if b}
    static_beams = {int(b) for b in args.static_beams.split(",") if b}
    skip = {("generate static", k, b) for k in beam_options for b in batches
            if b not in static_batches or k not in static_beams}
    generate_beams = {int(b) for b in args.generate_beams.split(",") if b}
    skip |= {("generate", k, b) for k in beam_options for b in batches if k not in generate_beams}
    # Ours first, generate's static-cache path (slow to compile) last.
    backends = [("generate", TransformersMTBackend(model), device.type == "cuda")]
    work = Path(tempfile.mkdtemp(prefix="translate-speed-"))
    try:
        if device.type == "cuda":
            backends[:0] = [("fast", FastMarianBackend(model), True)] + [
                (f"fast, attention={mode}", FastMarianBackend(model, attention=mode), True)
                for mode in args.attention_variants.split(",") if mode] + [
                (f"fast, kernels={parts}", FastMarianBackend(model, kernels=() if parts == "none" else parts.split(",")),
                 True) for parts in args.kernel_variants.split(";") if parts]
        else:
            backends.append(("fast (eager, no graphs)", FastMarianBackend(model, use_graphs=False), False))
            skip |= {("fast (eager, no graphs)", k, b) for k in beam_options for b in batches if b != 64}
            if ctranslate2_version() != "not installed":
                from pipeline.mt.ctranslate2 import CTranslate2Backend

                checkpoint = save_with_vocab(published_model(spread=False), work)
                for quantization in ("int8", "float32"):
                    started = time.perf_counter()
                    backend = CTranslate2Backend(checkpoint, quantization=quantization, cache_root=work / "ct2",
                                                 threads=args.threads)
                    log(f"converted to CTranslate2 {quantization} in {time.perf_counter() - started:.1f}s")
                    backends.insert(len(backends) - 2 if quantization == "int8" else len(backends),
                                    (f"ctranslate2 {quantization}", backend, False))
                skip |= {("ctranslate2 float32", k, b) for k in beam_options for b in batches if b != 64}
        backends.append(("generate static", StaticCacheBackend(model), True))
        if not args.agreement_only:
            table = speed_table(backends, device, batches, beam_options, args.budget, skip, log, args.cap)
            print_table(table, f"{SOURCE_TOKENS} -> {TARGET_TOKENS} tokens, opus-mt-ja-en shape, "
                        f"{str(dtype).removeprefix('torch.')}", command, device_name)
        if args.profile and device.type == "cuda":
            print_profile(backends[0][1], beam_options)
        if not args.no_agreement:
            print_agreement(device, dtype, work, args.spread_std, command, device_name,
                            [v for v in args.agreement_variants.split(";") if v])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_profile(fast, beam_options) -> None:
    """Where one call's GPU time goes (kernels summed over the call), for the notes."""
    from torch.profiler import ProfilerActivity, profile

    for beams in beam_options:
        for batch in (1, 256):
            rows = sources(batch, 60716, seed=batch)
            fast.generate(rows, TARGET_TOKENS, beams)   # captured already; warm
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                fast.generate(rows, TARGET_TOKENS, beams)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = sum(e.count for e in events)
            gpu_us = sum(e.self_device_time_total for e in events)
            print(f"\n### profile: fast, beams {beams}, batch {batch}: {kernels} GPU ops, "
                  f"{gpu_us / 1000:.1f} ms GPU busy\n")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
                print(f"- {e.self_device_time_total / 1000:7.2f} ms  x{e.count:5d}  {e.key[:90]}")


def print_agreement(device, dtype, work, std, command, device_name, variants=()) -> None:
    spread = published_model(spread=True, seed=2, std=std)
    rows = sources(64, spread.config.vocab_size, seed=3, length=None)
    print(f"\n## agreement on 64 fixed sentences (5-40 tokens, max_new_tokens 40, weights std {std})\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {device_name}; {command}\n")
    if device.type == "cuda":
        for label, dt in (("float32", torch.float32), (str(dtype).removeprefix("torch."), dtype)):
            model = published_model(spread=True, seed=2, std=std).to(device, dt)
            for beams in (1, 4):
                result = agreement(TransformersMTBackend(model), FastMarianBackend(model), rows, beams)
                print(f"- fast vs generate, {label}, beams {beams}: {result}")
                for parts in variants:
                    fast = FastMarianBackend(model, kernels=() if parts == "none" else parts.split(","))
                    result = agreement(TransformersMTBackend(model), fast, rows, beams)
                    print(f"- fast, kernels={parts} vs generate, {label}, beams {beams}: {result}")
        return
    if ctranslate2_version() == "not installed":
        print("- ctranslate2 not installed: no int8 agreement")
        return
    from pipeline.mt.ctranslate2 import CTranslate2Backend

    checkpoint = save_with_vocab(spread, work / "spread")
    fp32 = CTranslate2Backend(checkpoint, quantization="float32", cache_root=work / "ct2s")
    int8 = CTranslate2Backend(checkpoint, quantization="int8", cache_root=work / "ct2s")
    generate = TransformersMTBackend(spread)
    print(f"- ctranslate2 float32 vs generate (float32), greedy: {agreement(generate, fp32, rows, 1)}")
    print(f"- ctranslate2 int8 vs ctranslate2 float32, greedy: {agreement(fp32, int8, rows, 1)}")
    print(f"- ctranslate2 int8 vs ctranslate2 float32, beams 4: {agreement(fp32, int8, rows, 4)}")
    print(f"- ctranslate2 float32 vs generate, beams 4: {agreement(generate, fp32, rows, 4)}")
    print(f"- fast (eager) vs generate, float32, greedy: "
          f"{agreement(generate, FastMarianBackend(spread, use_graphs=False), rows, 1)}")


if __name__ == "__main__":
    main()
