"""phi-2 engine speed by dtype, and decoding under a 15 GiB memory cap (a 16 GB card such as a T4).

Builds phi-2 at the published shape with random weights on the GPU in bfloat16 and in float16 and
times FastPhiEngine.generate (the plan for this GPU: llm/hardware.py) at batch 1 and 128. Then,
with the process capped by torch.cuda.set_per_process_memory_fraction (--cap-gib, default 15) and
--reserve-gib held for the two translation models, runs `ask`-shaped decoding (batch 1) and
`ask --batch`-shaped decoding (--cap-batch questions): the engine sizes its KV cache to what is
usable and splits a batch that would not fit, so both must finish; it prints tokens/s, the rows
per group it chose and the peak memory.

    python benchmarks/dtype_speed.py                 # ~3 minutes on an H100
    python benchmarks/dtype_speed.py --skip-speed    # only the capped runs
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from llm_decode import EOS, build_model, prompts_for, wall

from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.llm.hardware import plan, probe


def engine_for(model, dtype_name: str, max_batch_size: int) -> FastPhiEngine:
    chosen = plan(probe("cuda"), dtype=dtype_name)
    return FastPhiEngine(model, EOS, max_batch_size=max_batch_size, use_triton=chosen.triton_kernels,
                         config=chosen.decode_config())


def speed(args) -> None:
    print("| dtype | batch | tokens/s | ms/step |\n|---|---|---|---|")
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    for dtype_name in ("bfloat16", "float16"):
        model = build_model(getattr(torch, dtype_name))
        engine = engine_for(model, dtype_name, 128)
        for batch in (1, 128):
            prompts = prompts_for(batch, args.prompt_len)
            engine.generate(prompts, settings)
            seconds = wall(lambda: engine.generate(prompts, settings), repeat=3)  # noqa: B023 - called now
            print(f"| {dtype_name} | {batch} | {batch * args.new_tokens / seconds:,.0f} | "
                  f"{seconds / args.new_tokens * 1e3:.2f} |", flush=True)
        engine = model = None  # freed before the next dtype is built
        torch.cuda.empty_cache()


def capped(args) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    reserve = torch.empty(int(args.reserve_gib * 2**30), dtype=torch.uint8, device="cuda")
    dtype_name = plan(probe("cuda")).dtype
    model = build_model(getattr(torch, dtype_name))
    engine = engine_for(model, dtype_name, 128)
    print(f"\ncapped at {args.cap_gib} GiB ({args.reserve_gib} GiB held for the translation models), {dtype_name}")
    print("| run | questions | rows per group | tokens/s | peak GiB |\n|---|---|---|---|---|")
    for label, count in (("ask", 1), ("ask --batch", args.cap_batch)):
        prompts = prompts_for(count, args.prompt_len, seed=count)
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        rows = count  # the paged cache runs every row at once where its tokens fit (as they do here)
        torch.cuda.reset_peak_memory_stats()
        out = []
        seconds = wall(lambda: out.append(engine.generate(prompts, settings)))  # noqa: B023 - called now
        produced = sum(len(g.token_ids) for g in out[-1])
        assert len(out[-1]) == count, "a question was lost"
        print(f"| {label} | {count} | {rows} | {produced / seconds:,.0f} | "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} |", flush=True)
    del reserve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--cap-gib", type=float, default=15.0)
    parser.add_argument("--reserve-gib", type=float, default=0.7)
    parser.add_argument("--cap-batch", type=int, default=128)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-cap", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dtype_speed.py times the GPU engine: no CUDA GPU here")
    hardware = probe("cuda")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {hardware.name} "
          f"(compute capability {hardware.capability}); torch {torch.__version__}; triton {hardware.triton}; "
          f"command: {' '.join(sys.argv)}")
    print(f"plan here: {plan(hardware).summary()}")
    if not args.skip_speed:
        speed(args)
    if not args.skip_cap:
        capped(args)


if __name__ == "__main__":
    main()
