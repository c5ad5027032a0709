"""What a cold process's first translation pays on top of the translation: one process loads the
ja->en checkpoint lean (as `ask` does on CUDA) and translates the benchmark question four times
(the first eagerly, the second capturing its graphs, then replaying), then a question of another
shape once (eager again, every kernel already loaded). `--warm` first runs one attention and one
matrix product on the GPU. `--prime thread` runs pipeline/mt/prime.py's priming (Triton's cache
key, one product of each GPU library) in a thread from just after torch's import, beside
transformers' import and the load, as a cold `ask` does; `--prime serial` runs it first on the
main thread (what it costs alone). Each reports when the process was ready to
translate and when its first translation ended, from the process's start.

    cd benchmarks && python3 first_translation.py --root /tmp/cold          # after cold_start.py built it
    cd benchmarks && python3 first_translation.py --root /tmp/cold --warm
    cd benchmarks && python3 first_translation.py --root /tmp/cold --prime thread

Run each a few times in fresh processes, with a throwaway first process (Triton's kernel cache).
"""

from __future__ import annotations

import argparse
import time

began = time.perf_counter()
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--root", required=True, help="cold_start.py's checkpoint directory")
parser.add_argument("--warm", action="store_true", help="one attention and one matrix product first")
parser.add_argument("--prime", choices=("thread", "serial"), help="prime the kernels (pipeline/mt/prime.py)")
args = parser.parse_args()

import torch  # noqa: E402 - timed from the process's start
import torch.nn.functional as F  # noqa: E402

from pipeline.mt.prime import first_products, prime_in_background, triton_cache_key  # noqa: E402

directory, device = f"{args.root}/opus-mt-ja-en", torch.device("cuda")
primed, prime_start, finished = None, time.perf_counter(), []
if args.prime == "thread":
    primed = prime_in_background(device, torch.bfloat16)
    primed.add_done_callback(lambda _: finished.append(time.perf_counter()))  # when the thread ended
elif args.prime == "serial":
    triton_cache_key()
    first_products(device, torch.bfloat16)
prime_end = time.perf_counter()

from transformers import AutoConfig  # noqa: E402

from ask_end_to_end import QUESTION  # noqa: E402 - beside this file
from pipeline.loading import load_tokenizer  # noqa: E402
from pipeline.mt.fast_marian import FastMarianBackend  # noqa: E402
from pipeline.mt.marian_direct import load_direct_marian  # noqa: E402

model = load_direct_marian(directory, "opus-mt-ja-en", AutoConfig.from_pretrained(directory), device, torch.bfloat16,
                           "fast, bfloat16")
tokenizer = load_tokenizer(directory, "opus-mt-ja-en")
backend = FastMarianBackend(model)
torch.cuda.synchronize()
loaded = time.perf_counter()
if primed is not None:
    primed.result()
    prime_end = finished[0] if finished else time.perf_counter()
if args.warm:
    x = torch.randn(8, 8, 32, 64, device=device, dtype=torch.bfloat16)
    F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(8, 1, 1, 32, dtype=torch.bool, device=device))
    F.linear(x.reshape(-1, 64).repeat(1, 8), torch.randn(512, 512, device=device, dtype=torch.bfloat16))
    torch.cuda.synchronize()
warmed = time.perf_counter()


def timed(ids: list[int]) -> float:
    start = time.perf_counter()
    backend.generate([ids], 2 * len(ids) + 16, 6)
    torch.cuda.synchronize()
    return time.perf_counter() - start


ids = tokenizer(QUESTION)["input_ids"]
runs = [timed(ids) for _ in range(4)]
other = timed(ids[:10] + ids[-1:])
mode = f"prime {args.prime}" if args.prime else "warm" if args.warm else "plain"
print(f"{mode}: start and load {loaded - began:.2f} s, warm-up {warmed - loaded:.2f} s, ready {max(warmed, prime_end) - began:.2f} s, "
      f"priming {'-' if not args.prime else f'{prime_end - prime_start:.2f} s'} (from {prime_start - began:.2f} s), "
      f"first translation done {max(warmed, prime_end) - began + runs[0]:.2f} s; "
      f"the question ({len(ids)} tokens, 6 beams) {' '.join(f'{t:.3f}' for t in runs)} s (eager, capture, replay, "
      f"replay); another shape's first run {other:.3f} s ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
      f"{torch.cuda.get_device_name()}, torch {torch.__version__})")
