"""Where a decode step's time goes: torch.profiler over one FastPhiEngine.generate (published shapes,
random fp16 weights), the GPU's busy time per step against the wall time per step (a gap between
them is the GPU waiting for the host) and the kernels that take the most of it. Written for issue
32's batch-1 gap (the paged tree against the slot cache); it runs in this tree or, from its root, in
an older checkout (its engine and llm_decode.py are imported from the working directory):

    PYTHONPATH=. python benchmarks/step_profile.py --batch 1
    cd /path/to/older && PYTHONPATH=. python /path/to/this/benchmarks/step_profile.py --batch 1

Lines start with "step profile" (benchmarks/paged_gpu_proof.sh's part `profile` runs both trees).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))  # the working tree's llm_decode

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from llm_decode import EOS, build_model, prompts_for  # noqa: E402

from pipeline.llm.fast_engine import FastPhiEngine  # noqa: E402
from pipeline.spec import GenerationSettings  # noqa: E402


def device_us(event) -> float:
    """An averaged event's own GPU time in us (the attribute's name changed across torch versions)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    engine = FastPhiEngine(build_model(), EOS, max_batch_size=max(args.batch, 8))
    prompts, settings = prompts_for(args.batch, args.prompt_len), GenerationSettings(max_new_tokens=args.new_tokens)
    for _ in range(3):  # graphs captured, the pool sized, Triton compiled
        engine.generate(prompts, settings)
    torch.cuda.synchronize()
    began = time.perf_counter()
    steps = len(engine.generate(prompts, settings)[0].token_ids)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - began) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, settings)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if device_us(e) > 0]
    busy_ms = sum(device_us(e) for e in events) / steps / 1e3
    tree = os.path.basename(os.getcwd())
    print(f"step profile: {tree}, batch {args.batch}, {steps} steps: wall {wall_ms:.3f} ms/step, GPU busy"
          f" {busy_ms:.3f} ms/step ({busy_ms / wall_ms:.1%}; wall without profiler)", flush=True)
    for event in sorted(events, key=device_us, reverse=True)[:args.top]:
        print(f"step profile: {tree}: {device_us(event) / steps:8.1f} us/step, {event.count / steps:6.1f} a step,"
              f" {event.key[:100]}", flush=True)


if __name__ == "__main__":
    main()
