#!/usr/bin/env bash
# Issue 19's GPU proof in one command, from the repository root (an H100/H200; ~6 minutes):
#   bash benchmarks/serve_gpu_proof.sh            # GPU tests, then serve_load (default server) incl. the mixed run
#   ROUNDS=4 bash benchmarks/serve_gpu_proof.sh   # more questions per client
#   SKIP_TESTS=1 bash benchmarks/serve_gpu_proof.sh   # the benchmark alone
# 1. the continuous batch's GPU tests at phi-2's published shape (random weights, CUDA graphs): rows of
#    20 to 1,800 tokens joining and leaving a 64-row batch, each as alone; a burst of 200 mixed requests
#    through the server's scheduler; the fast engine's tokens against transformers' (per-row columns);
# 2. benchmarks/serve_load.py against `bilingual-qa serve` with its defaults, beside the engine's own
#    batch-8 and batch-64 throughput, with the mixed-length run (answers of 32 to 1,500 tokens).
# Logs go to stdout and, when OUT is set, to $OUT (serve_load.md, the server's log).
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
OUT="${OUT:-$(mktemp -d)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout "${TEST_SECONDS:-240}" python -m pytest -q -rs tests/llm/test_fast_batch_gpu.py tests/llm/test_fast_batch.py \
  "tests/llm/test_fast_generate.py::test_engine_on_the_triton_kernels_gives_the_tokens_of_transformers" \
  ${EXTRA_TESTS:-} 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
timeout "${LOAD_SECONDS:-330}" python benchmarks/serve_load.py --rounds "${ROUNDS:-2}" --models /tmp/serve-load-published \
  --out "$OUT/serve_load.md" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/serve_load.txt"
cp /tmp/serve-load-published/server.log "$OUT/server.log" 2>/dev/null
tail -5 "$OUT/server.log" 2>/dev/null
