"""`compare` of phi-2 and a LoRA adapter of it, at the published shapes, on the GPU.

Builds random-weight checkpoints in the published formats (phi-2: 2.78B parameters in float16;
opus-mt shapes for the two translators) and an r=8 LoRA adapter on q/k/v/dense/fc1/fc2 made by peft
(B drawn at random, as after training), then measures:
- load: the pipeline with the base (`BilingualQA.from_pretrained`), the adapter merged in place into
  those weights and taken out again (what `compare` does between models), and for reference a fresh
  load of the adapter (base weights read again plus the merge: what a second model used to cost);
- per question: `compare` base vs adapter, each model's answer stage and the whole call, the first
  question (CUDA-graph capture) apart from the ones after it;
- GPU memory: peak allocated during compare against the base alone (one copy of the base weights).
Answers are held at --answer-tokens new tokens (random weights never write end-of-text).

    python benchmarks/compare_adapter.py                 # published shapes, on the GPU
    python benchmarks/compare_adapter.py --tiny          # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTION = "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="where checkpoints are built (kept for reruns)")
    parser.add_argument("--questions", type=int, default=5, help="compare calls measured after the first")
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--engine", default="auto", choices=("auto", "fast", "transformers"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    return parser.parse_args()


def build(root: Path, tiny: bool, device: str, rank: int) -> dict[str, Path]:
    import torch

    from pipeline.checkpoints import build_lora_adapter, build_tiny_marian, build_tiny_phi2

    phi = {} if tiny else dict(hidden=2560, layers=32, heads=32, vocab_rows=51200)
    marian = {} if tiny else dict(d_model=512, layers=6, ffn=2048, heads=8, vocab_size=60716)
    dtype = torch.float32 if tiny else torch.float16
    paths = {"llm": root / "phi-2", "adapter": root / f"phi-2-lora-r{rank}", "ja_en": root / "opus-mt-ja-en",
             "en_ja": root / "fugumt-en-ja"}
    start = time.perf_counter()
    if not (paths["llm"] / "config.json").exists():
        build_tiny_phi2(paths["llm"], dtype=dtype, device=device, **phi)
        build_tiny_marian(paths["ja_en"], "ja", "en", **marian)
        build_tiny_marian(paths["en_ja"], "en", "ja", **marian)
    if not (paths["adapter"] / "adapter_config.json").exists():
        # scale: B of a trained adapter is small next to the base; 0.01 keeps the merged model sane
        build_lora_adapter(paths["adapter"], paths["llm"], r=rank, device=device, dtype=dtype,
                           scale=0.05 if tiny else 0.01)
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"checkpoints ready in {time.perf_counter() - start:.1f} s under {root}", flush=True)
    return paths


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    args = parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("compare_adapter: skipped, no CUDA GPU here (use --tiny for a CPU smoke test)")
        return 0
    device = "cpu" if args.tiny else "cuda"
    os.environ["BILINGUAL_QA_QUIET"] = "1"
    import peft
    import transformers

    from pipeline import BilingualQA
    from pipeline.llm.answerer import Answerer
    from pipeline.spec import GenerationSettings
    from pipeline.llm.models import resolve_llm

    root = args.root or Path(tempfile.gettempdir()) / f"bilingual-qa-compare-adapter{'-tiny' if args.tiny else ''}"
    paths = build(root, args.tiny, device, args.rank)
    settings = GenerationSettings(max_new_tokens=args.answer_tokens)
    base, adapter = str(paths["llm"]), str(paths["adapter"])

    start = time.perf_counter()
    qa = BilingualQA.from_pretrained(base, str(paths["ja_en"]), str(paths["en_ja"]), device=device,
                                     engine=args.engine)
    synchronize(device)
    load_pipeline = time.perf_counter() - start
    base_memory = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    source = resolve_llm(adapter)
    start = time.perf_counter()
    qa.answerer.switch_to(source)
    synchronize(device)
    merge = time.perf_counter() - start
    start = time.perf_counter()
    qa.answerer.switch_to(resolve_llm(base))
    synchronize(device)
    unmerge = time.perf_counter() - start

    calls, answer_times = [], {"base": [], "adapter": []}
    for _ in range(args.questions + 1):
        start = time.perf_counter()
        results = qa.compare(QUESTION, [base, adapter], settings=settings, engine=args.engine)
        synchronize(device)
        calls.append(time.perf_counter() - start)
        for key, result in zip(("base", "adapter"), results):
            answer_times[key].append(result.timings["answer"])
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    tokens = [r.generated_tokens for r in results]
    engine = results[0].engine

    del qa
    if device == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    fresh = Answerer.from_pretrained(adapter, device=device, engine="transformers")
    synchronize(device)
    fresh_load = time.perf_counter() - start
    del fresh

    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    print(f"\n{datetime.date.today()} · {name} · torch {torch.__version__} · transformers "
          f"{transformers.__version__} · peft {peft.__version__} · engine {engine} · LoRA r={args.rank} on"
          f" q/k/v/dense/fc1/fc2 · {args.answer_tokens} new tokens ({tokens} generated)")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    rows = [
        ("load: pipeline with the base (phi-2 + both translators)", load_pipeline),
        ("load: adapter merged into the loaded base, in place", merge),
        ("load: adapter taken out again (exact restore)", unmerge),
        ("load, for reference: adapter loaded fresh (base read again + merge)", fresh_load),
        ("compare, first question (graph capture, two models)", calls[0]),
        ("compare, per question after it (median, two models)", statistics.median(calls[1:]) if len(calls) > 1 else 0),
        ("  answer stage, base (median after the first)", statistics.median(answer_times["base"][1:] or [0])),
        ("  answer stage, adapter (median after the first)", statistics.median(answer_times["adapter"][1:] or [0])),
    ]
    print("| measure | seconds |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")
    if device == "cuda":
        print(f"\nGPU memory: {base_memory / 2**30:.2f} GiB allocated with the pipeline loaded; peak during"
              f" merge, unmerge and compare {peak / 2**30:.2f} GiB (a second copy of phi-2 would add 5.2 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
