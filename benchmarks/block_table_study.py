"""How the decode attention kernels read the block table: per tile, or the row's whole table once.

Issue 32's batch-1 decode ran 6-8% below the slot cache's (docs/benchmarks.md): a near-constant
0.14-0.22 ms a step, about 5 us per layer, the size of one dependent global load per tile. This
times both ways on the same GPU at phi-2's published shape (random fp16 weights, random paged cache):

1. the 32 layers' attention kernels alone, captured in one graph (llm_decode.py's AttentionBench),
   us per layer, for the tiles in use (ATTENTION_TILES) read per tile, with table_once=True, and with
   consecutive=True (each row's consecutive blocks found by arithmetic), and tiles of 64 and 128
   columns read per tile (each covering whole blocks); the bench's rows hold consecutive blocks, as a
   row alone does: the last two again with the blocks shuffled;
2. FastPhiEngine.generate end to end, batch 1 and 128, tokens/s (alternating, `--rounds`): every tile
   read per tile, once, once with consecutive blocks, the defaults, the defaults with each step's
   tokens copied to the host on a second stream (DecodeConfig.host_copy_beside), and the fastest
   kernel of part 1 at batch 1.

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

from pipeline.kernels.attention_tiles import AttentionConfig
from pipeline.llm.decode_config import DEFAULT_DECODE
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.spec import GenerationSettings


def every_tile(config, **reads):
    """`config` with every attention tile reading the block table as `reads` say (table_once, consecutive)."""
    return replace(config, attention_tiles=tuple((rows, replace(tile, **reads))
                                                 for rows, tile in config.attention_tiles))


def candidates(tile, rows: int) -> list:
    """The tile in use, read per tile, once per row, and once with consecutive blocks found by arithmetic;
    for a few rows wider tiles read per tile (a tile of 64 or 128 columns covers whole blocks: fewer
    dependent loads one after another)."""
    wider = [AttentionConfig("dot", n, warps, stages) for n in (64, 128) for warps in (2, 4) for stages in (2, 4)]
    return [replace(tile, table_once=False, consecutive=False), replace(tile, table_once=True, consecutive=False),
            replace(tile, table_once=True, consecutive=True), *(wider if rows <= 8 else [])]


def shuffle(bench) -> None:
    """The bench's rows hold consecutive blocks (as a row alone does); shuffle them, as rows that grew
    side by side hold theirs."""
    flat = bench.table.flatten()
    bench.table.copy_(flat[torch.randperm(flat.numel(), device=flat.device)].view_as(bench.table))
    bench.ref = bench.reference()


def kernels(model, batches: list[int], lengths: list[int]) -> dict:
    """Each batch's candidates timed; the fastest correct one at the first length, by batch."""
    engine = FastPhiEngine(model, EOS, max_batch_size=max(batches), use_graphs=False)
    fastest = {}
    for rows in batches:
        for length in lengths:
            if rows * length > 128 * 512:  # the pool for 128 rows of 1,024 columns is 44 GiB
                continue
            bench = AttentionBench(engine, rows, length)
            bench.ref = bench.reference()
            timed = []
            for config in candidates(engine.config.attention(rows), rows):
                try:
                    us, error = bench.time(config, replays=25)
                except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, skipped
                    print(f"table study: kernels, batch {rows}: {config} failed: {type(exc).__name__} {exc}"[:300])
                    continue
                timed.append((us, error, config))
                print(f"table study: kernels, batch {rows}, {length} columns: {us:.2f} us/layer (error"
                      f" {error:.1e}) {config}", flush=True)
            fastest.setdefault(rows, min((t for t in timed if t[1] < 2e-3), key=lambda t: t[0])[2])
            shuffle(bench)
            for config in candidates(engine.config.attention(rows), rows)[1:3]:
                us, error = bench.time(config, replays=25)
                print(f"table study: kernels, batch {rows}, {length} columns, blocks shuffled: {us:.2f} us/layer"
                      f" (error {error:.1e}) {config}", flush=True)
            del bench
    engine.cache.release()
    return fastest


def generate(model, batches: list[int], prompt_len: int, new_tokens: int, rounds: int, fastest: dict) -> None:
    settings = GenerationSettings(max_new_tokens=new_tokens)
    configs = {"per tile": every_tile(DEFAULT_DECODE, table_once=False, consecutive=False),
               "table once": every_tile(DEFAULT_DECODE, table_once=True, consecutive=False),
               "consecutive": every_tile(DEFAULT_DECODE, table_once=True, consecutive=True),
               "default": DEFAULT_DECODE,
               "default, tokens copied beside": replace(DEFAULT_DECODE, host_copy_beside=True)}
    engines = {name: FastPhiEngine(model, EOS, max_batch_size=max(batches), config=config)
               for name, config in configs.items()}
    if 1 in fastest:
        chosen = dict(DEFAULT_DECODE.attention_tiles) | {1: fastest[1]}
        print(f"table study: the fastest kernel at batch 1: {fastest[1]}", flush=True)
        engines["fastest at batch 1"] = FastPhiEngine(model, EOS, max_batch_size=max(batches), config=replace(
            DEFAULT_DECODE, attention_tiles=tuple(sorted(chosen.items()))))
    for round_ in range(1, rounds + 1):
        for name, engine in engines.items():
            for batch in batches:
                prompts = prompts_for(batch, prompt_len)
                engine.generate(prompts, settings)  # its pool and graphs, untimed
                seconds = wall(lambda: engine.generate(prompts, settings), repeat=3)  # noqa: B023 - called now
                print(f"table study: generate, round {round_}, {name}, batch {batch}: "
                      f"{batch * new_tokens / seconds:,.0f} tokens/s", flush=True)
            engine.cache.release()  # one engine's pool at a time: six of 128 rows would not fit an H100


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
    fastest = kernels(model, batches, [int(n) for n in args.lengths.split(",")])
    if not args.skip_generate:
        generate(model, batches, args.prompt_len, args.new_tokens, args.rounds, fastest)


if __name__ == "__main__":
    main()
