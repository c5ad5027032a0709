"""Multi-LoRA decode speed: a base and a LoRA adapter in one batch of FastPhiEngine, unmerged per row.

Builds phi-2 at the published shape with random weights on the GPU and an r=8 LoRA adapter on
q/k/v/dense/fc1/fc2 made by peft (B drawn at random, as after training; saved and loaded back
through the engine's own `add_adapter`, i.e. peft's loader), then times greedy decoding with CUDA
graphs at each batch size:
- base: the engine with no adapter loaded (the LoRA work is skipped entirely);
- base rows, adapter loaded: every row the base, the LoRA products running with empty masks;
- half/half: the first half of the rows the base, the second half the adapter (the issue's target:
  at batch 64, at least 75% of the base-only tokens/s);
- all adapter rows;
- variants of the half/half batch: the MLP beside attention on a second stream (by default a batch
  applying LoRA takes the fused layer instead, its LoRA products beside the base ones), and below 17
  rows the skinny products (by default LoRA batches take the fused layer there too).
It also reports how the rows agree: half/half rows against the same prompts in an all-base and an
all-adapter batch, and adapter rows against the adapter merged into the weights (what `ask --llm
ADAPTER` runs), position by position (random weights make near-ties, so low precision can flip a few),
and the bytes of the stacked factors against the base's.

    PYTHONPATH=. python benchmarks/multi_lora.py                  # published shape, on the GPU
    PYTHONPATH=. python benchmarks/multi_lora.py --tiny           # smoke test on the CPU (no graphs)

The table is also written to $OUT/multi_lora.md when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.spec import GenerationSettings
from pipeline.llm.fast_engine import FastPhiEngine

TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


def build_model(tiny: bool, dtype: torch.dtype, device: str):
    from transformers import PhiForCausalLM

    from pipeline.checkpoints import phi2_config

    shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4) if tiny else {}
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = PhiForCausalLM(phi2_config(**shape)).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def build_adapter(model, directory: Path, rank: int, scale: float):
    """An r=`rank` adapter of `model` saved by peft (B random), the model left without peft's layers."""
    from peft import LoraConfig, get_peft_model

    from pipeline.llm.adapters import read_adapter

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS)))
    generator = torch.Generator(device=model.device).manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, device=model.device) * scale)
    peft_model.save_pretrained(directory)
    peft_model.unload()  # the base's own modules back, weights untouched
    return read_adapter(str(directory), "adapter")


def timed(engine, prompts, settings, adapters, device: str, repeat: int) -> tuple[float, int, list]:
    """(median seconds of one generate call, tokens it produced, its rows)."""
    engine.generate(prompts, settings, adapters=adapters)  # captures the graph of this batch size
    times, out = [], None
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = engine.generate(prompts, settings, adapters=adapters)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times), sum(len(g.token_ids) for g in out), [g.token_ids for g in out]


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))
    total = sum(min(len(x), len(y)) for x, y in zip(a, b))
    whole = sum(x == y for x, y in zip(a, b))
    return f"{same / max(total, 1):.1%} of tokens, {whole}/{len(a)} rows identical"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, graphs off (a smoke test)")
    parser.add_argument("--batches", default="8,64", help="batch sizes to time")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    settings = GenerationSettings(max_new_tokens=8 if args.tiny else args.new_tokens)
    header = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}",
              f"versions: torch {torch.__version__}",
              f"command: {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}",
              f"workload: phi-2 {'tiny' if args.tiny else 'published'} shape, random {str(dtype)[6:]} weights, "
              f"LoRA r={args.rank} on {'/'.join(TARGETS)}, {args.prompt_len}-token prompts, "
              f"{settings.max_new_tokens} new tokens, greedy, CUDA graphs {'off' if args.tiny else 'on'}"]
    print("\n".join(header), flush=True)
    model = build_model(args.tiny, dtype, device)
    base_bytes = sum(p.nbytes for p in model.parameters())
    vocab = model.config.vocab_size - 1000
    eos = model.config.eos_token_id
    options = dict(use_graphs=False, use_triton=False) if args.tiny else {}
    engine = FastPhiEngine(model, eos, max_batch_size=max(batches), **options)
    generator = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=generator).tolist() for b in batches}
    rows, results = [], {}

    def configured(**changes) -> None:
        """The engine's DecodeConfig changed; graphs are captured again with it."""
        engine.config = dataclasses.replace(engine.config, **changes)
        engine.cache.drop_graphs()

    def measure(label: str, batch: int, adapters):
        seconds, tokens, out = timed(engine, prompts[batch], settings, adapters, device, args.repeat)
        results[(label, batch)] = (tokens / seconds, out)
        rows.append((label, batch, tokens / seconds, seconds / settings.max_new_tokens * 1e3, tokens))
        print(f"  {label} | {batch} | {tokens / seconds:,.0f} tokens/s | {rows[-1][3]:.2f} ms/step", flush=True)

    for batch in batches:
        measure("base (no adapter loaded)", batch, None)
    with tempfile.TemporaryDirectory() as root:
        adapter = build_adapter(model, Path(root) / "lora", args.rank, 0.002 if not args.tiny else 0.05)
        began = time.perf_counter()
        engine.add_adapter(adapter, model)
        loaded_in = time.perf_counter() - began
        for batch in batches:
            half = batch // 2
            measure("base rows, adapter loaded", batch, [0] * batch)
            measure("half base, half adapter", batch, [0] * half + [1] * (batch - half))
            measure("all adapter rows", batch, [1] * batch)
        default = engine.config
        for batch in batches:
            half = batch // 2
            if batch >= default.fused_min_rows and not args.tiny:
                configured(lora_mlp_beside=True)
                measure("half/half, MLP beside attention", batch, [0] * half + [1] * (batch - half))
            elif batch < default.fused_min_rows:
                configured(lora_fused_layer=False)
                measure("half/half, skinny products", batch, [0] * half + [1] * (batch - half))
            configured(**{f.name: getattr(default, f.name) for f in dataclasses.fields(default)})
        lora_bytes = engine.weights.lora.nbytes
        # the adapter merged into the weights, as `ask --llm ADAPTER` runs it (same engine, no LoRA rows)
        from pipeline.llm.adapters import apply_adapter

        applied = apply_adapter(model, adapter)
        big = max(batches)
        merged = [g.token_ids for g in engine.generate(prompts[big], settings)]
        applied.remove()
    lines = header + ["", "| rows | batch | tokens/s | ms/step | tokens | vs base |", "|---|---|---|---|---|---|"]
    for label, batch, rate, ms, tokens in rows:
        ratio = rate / results[("base (no adapter loaded)", batch)][0]
        lines.append(f"| {label} | {batch} | {rate:,.0f} | {ms:.2f} | {tokens} | {ratio:.1%} |")
    big, half = max(batches), max(batches) // 2
    mixed = results[("half base, half adapter", big)][1]
    facts = [
        f"batch {big} half/half vs base-only: {results[('half base, half adapter', big)][0] / results[('base (no adapter loaded)', big)][0]:.1%} (target: at least 75%)",
        f"batch {big} agreement, base rows of the half/half batch vs the all-base batch: "
        + agreement(mixed[:half], results[("base (no adapter loaded)", big)][1][:half]),
        f"batch {big} agreement, adapter rows of the half/half batch vs the all-adapter batch: "
        + agreement(mixed[half:], results[("all adapter rows", big)][1][half:]),
        f"batch {big} agreement, adapter rows (unmerged) vs the adapter merged into the weights: "
        + agreement(results[("all adapter rows", big)][1], merged),
        f"batch {big} agreement, adapter rows vs base rows of the same prompts (the adapter's effect): "
        + agreement(results[("all adapter rows", big)][1], results[("base (no adapter loaded)", big)][1]),
        f"stacked LoRA factors: {lora_bytes / 1e6:.1f} MB beside {base_bytes / 1e9:.2f} GB of base weights;"
        f" add_adapter (peft load, stack, graphs dropped) {loaded_in:.2f} s",
    ]
    if device == "cuda":
        facts.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    text = "\n".join(lines + [""] + [f"- {fact}" for fact in facts])
    print("\n" + text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "multi_lora.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
