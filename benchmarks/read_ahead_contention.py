"""Does reading phi-2's weights in the background (what a lean `ask` does) slow the main thread's
`import transformers` and tokenizer loads? One process per reading: `--readers 0` reads nothing,
N reads with N copying threads (pipeline/weights.py READERS). Run it on checkpoints cold_start.py
built (published shapes), with Python's bytecode cached, several times interleaved:

    cd benchmarks && for r in 0 1 4 2 0 1 4 2; do python3 read_ahead_contention.py --root /tmp/cold --readers $r; done
"""

from __future__ import annotations

import argparse
import time

began = time.perf_counter()
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--root", required=True, help="cold_start.py's checkpoint directory (phi-2, opus-mt-ja-en)")
parser.add_argument("--readers", type=int, default=4, help="copying threads; 0: no background read")
args = parser.parse_args()

import torch  # noqa: E402 - timed from the process's start

torch.zeros(1, device="cuda")
cuda_ready = time.perf_counter()
import pipeline.weights as weights  # noqa: E402

reading = None
if args.readers:
    weights.READERS = args.readers
    reading = weights.read_in_background(f"{args.root}/phi-2", torch.device("cuda"), torch.bfloat16, "phi-2")
started = time.perf_counter()
import transformers  # noqa: E402,F401
from transformers import AutoConfig, AutoTokenizer  # noqa: E402,F401

imported = time.perf_counter()
AutoTokenizer.from_pretrained(f"{args.root}/opus-mt-ja-en")
AutoTokenizer.from_pretrained(f"{args.root}/phi-2")
tokenized = time.perf_counter()
if reading is not None:
    reading.result()
done = time.perf_counter()
print(f"readers={args.readers} torch+cuda {cuda_ready - began:.2f} s, transformers {imported - started:.2f} s, "
      f"tokenizers {tokenized - imported:.2f} s, then waiting for the read {done - tokenized:.2f} s, "
      f"total {done - began:.2f} s ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
      f"{torch.cuda.get_device_name()}, torch {torch.__version__})")
