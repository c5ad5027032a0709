"""The slot cache's decode attention kernels alone, the figure block_table_study.py's paged kernels
are read against (issue 32: batch 1 within 2% of the slot cache). Run from the root of a checkout of
f8692f9 (the slot cache, whose engine and llm_decode.py's AttentionBench this imports):

    cd /path/to/f8692f9 && PYTHONPATH=. python /path/to/this/benchmarks/slot_kernels.py

Lines start with "table study" (benchmarks/paged_gpu_proof.sh's part `table` runs it when BEFORE is set).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))  # the older tree's llm_decode, not this one's

import torch  # noqa: E402

from llm_decode import EOS, AttentionBench, build_model  # noqa: E402

from pipeline.llm.fast_engine import FastPhiEngine  # noqa: E402


def main() -> None:
    engine = FastPhiEngine(build_model(), EOS, max_batch_size=128, use_graphs=False)
    for rows, length in ((1, 160), (1, 1024), (128, 160)):
        # a cache of just these rows and columns (the older engine has no public way; its cache grows
        # only, and 128 rows of 1,024 columns would take 44 GiB)
        engine._k_cache = engine._v_cache = None  # noqa: SLF001
        torch.cuda.empty_cache()
        engine._ensure_cache(rows, length + 1)  # noqa: SLF001
        bench = AttentionBench(engine, rows, length)
        bench.ref = bench.reference()
        config = engine.config.attention(rows)
        us, error = bench.time(config, replays=25)
        print(f"table study: slot cache kernels, batch {rows}, {length} columns: {us:.2f} us/layer (error"
              f" {error:.1e}) {config}", flush=True)
        del bench


if __name__ == "__main__":
    main()
