"""How the decode attention kernels read the block table: per tile, or the row's whole table once.

Issue 32's batch-1 decode ran 6-8% below the slot cache's (docs/benchmarks.md): a near-constant
0.14-0.22 ms a step, about 5 us per layer, the size of one dependent global load per tile. This
times both ways on the same GPU at phi-2's published shape (random fp16 weights, random paged cache):

1. the 32 layers' attention kernels alone, captured in one graph (llm_decode.py's AttentionBench),
   us per layer, for the tiles in use (ATTENTION_TILES) and the same with table_once=True;
2. FastPhiEngine.generate end to end with each, batch 1 and 128, tokens/s (alternating, `--rounds`).

    PYTHONPATH=. python benchmarks/block_table_study.py            # ~2 minutes on an H100
    PYTHONPATH=. python benchmarks/block_table_study.py --rounds 3 --new-tokens 256

Lines start with "table study" (benchmarks/paged_gpu_proof.sh keeps those).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import replace

import torch

from llm_decode import EOS, AttentionBench, build_model, prompts_for, wall

from pipeline.llm.decode_config import DEFAULT_DECODE
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.spec import GenerationSettings


def once_everywhere(config):
    """`config` with every attention tile reading its row's table once."""
    return replace(config, attention_tiles=tuple((rows, replace(tile, table_once=True))
                                                 for rows, tile in config.attention_tiles))


def kernels(model, batches: list[int], lengths: list[int]) -> None:
    engine = FastPhiEngine(model, EOS, max_batch_size=max(batches), use_graphs=False)
    for rows in batches:
        for length in lengths:
            if rows * length > 128 * 512:  # the pool for 128 rows of 1,024 columns is 44 GiB
                continue
            bench = AttentionBench(engine, rows, length)
            bench.ref = bench.reference()
            tile = engine.config.attention(rows)
            (per_tile, err_tile), (once, err_once) = (bench.time(replace(tile, table_once=flag), replays=25)
                                                      for flag in (False, True))
            print(f"table study: kernels, batch {rows}, {length} columns: per tile {per_tile:.2f} us/layer"
                  f" (error {err_tile:.1e}), table once {once:.2f} us/layer (error {err_once:.1e}); {tile}",
                  flush=True)
            del bench
    engine.cache.release()


def generate(model, batches: list[int], prompt_len: int, new_tokens: int, rounds: int) -> None:
    settings = GenerationSettings(max_new_tokens=new_tokens)
    engines = {"per tile": FastPhiEngine(model, EOS, max_batch_size=max(batches)),
               "table once": FastPhiEngine(model, EOS, max_batch_size=max(batches),
                                           config=once_everywhere(DEFAULT_DECODE))}
    for engine in engines.values():  # each its pool and graphs, before any timing
        for batch in batches:
            engine.generate(prompts_for(batch, prompt_len), settings)
    for round_ in range(1, rounds + 1):
        for name, engine in engines.items():
            for batch in batches:
                prompts = prompts_for(batch, prompt_len)
                seconds = wall(lambda: engine.generate(prompts, settings), repeat=3)  # noqa: B023 - called now
                print(f"table study: generate, round {round_}, {name}, batch {batch}: "
                      f"{batch * new_tokens / seconds:,.0f} tokens/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--lengths", default="160,1024", help="cache columns per row for the kernel timing")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()
    print(f"table study: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, command: {' '.join(sys.argv)}")
    model = build_model()
    batches = [int(b) for b in args.batches.split(",")]
    kernels(model, batches, [int(n) for n in args.lengths.split(",")])
    if not args.skip_generate:
        generate(model, batches, args.prompt_len, args.new_tokens, args.rounds)


if __name__ == "__main__":
    main()
