#!/usr/bin/env bash
# Issue 22's GPU proof in one command, from the repository root (an H100/H200; ~4 minutes):
#   bash benchmarks/cold_gpu_proof.sh                 # GPU tests, then cold_start.py
#   BEFORE=DIR bash benchmarks/cold_gpu_proof.sh      # also cold_start.py of another tree (a "before")
# 1. the tests of lean loading, of the configs and tokenizers read without transformers, of the quick
#    exit and of the primer: the fast engines decode the same ids from weights read straight into
#    their own modules as from transformers' models (CUDA graphs, Triton), and a lean pipeline
#    answers as the full one; with the translators' other GPU tests (they now load lean on CUDA);
# 2. benchmarks/cold_start.py at the published shapes: `--help`, a cold `ask` process (with where its
#    time goes: -X importtime and, into $OUT/cold.prof, cProfile) and `ask --server`.
# Logs go to stdout and, when OUT is set, to $OUT.
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
OUT="${OUT:-$(mktemp -d)}"
ROOT="${ROOT:-/tmp/cold}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout "${TEST_SECONDS:-240}" python3 -m pytest -q -rs -p no:cacheprovider \
  tests/test_direct_weights_gpu.py tests/test_direct_weights.py tests/test_model_files.py tests/test_quick_exit.py \
  tests/mt/test_prime.py tests/mt/test_mt_backends.py \
  tests/serve/test_translation_batcher.py "tests/test_cli_imports.py::test_ask_through_a_server_imports_neither_torch_nor_the_job_room" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
(cd benchmarks && timeout "${COLD_SECONDS:-300}" python3 cold_start.py --root "$ROOT" --answer-tokens 64 --help-runs 5 \
  --server-runs 5 --top 14 --cprofile "$OUT/cold.prof" --json "$OUT/cold.json") 2>&1 | tee "$OUT/cold.txt" | tail -70
if [ -n "${BEFORE:-}" ]; then
  BEFORE="$(cd "$BEFORE" && pwd)"   # absolute: the PYTHONPATH below is read after the cd
  (cd "$BEFORE/benchmarks" && PYTHONPATH="$BEFORE:${PYTHONPATH#*:}" timeout 200 python3 cold_start.py --root "$ROOT" \
    --answer-tokens 64 --help-runs 1 --no-server --top 6 --json "$OUT/before.json") 2>&1 | tee "$OUT/before.txt" | tail -30
fi
