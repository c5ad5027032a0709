#!/usr/bin/env bash
# The llm room's GPU checks in one command (issues 10 and 15), from the repository root:
#   bash benchmarks/llm_gpu_checks.sh            # tests, decode speed, dtype/15 GiB runs (~6 minutes on an H100)
#   bash benchmarks/llm_gpu_checks.sh cold       # also a cold `ask` process (another ~2-3 minutes)
# Results go to stdout and, when OUT is set, to $OUT/*.txt.
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
OUT="${OUT:-$(mktemp -d)}"
python -m pytest -q -rs tests/llm 2>&1 | tail -25 | tee "$OUT/llm_tests.txt"
(cd benchmarks && python llm_decode.py --quick --skip-transformers --out "$OUT/llm_decode.md") | tail -25
(cd benchmarks && python dtype_speed.py) 2>&1 | tee "$OUT/dtype_speed.txt"
if [ "${1:-}" = cold ]; then
  (cd benchmarks && python cold_start.py --answer-tokens 64) 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/cold_start.txt"
fi
