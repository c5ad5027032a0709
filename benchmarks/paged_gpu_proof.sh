#!/usr/bin/env bash
# Issues 31 and 32's GPU proof in one command, from the repository root (an H100/H200; ~15 minutes):
#   bash benchmarks/paged_gpu_proof.sh                      # tests, decode, serving, the memory limits
#   BEFORE=/path/to/older/checkout bash benchmarks/paged_gpu_proof.sh   # and the same figures of that tree,
#                                                           # alternating with this one on the same GPU
#   PARTS="tests decode" bash benchmarks/paged_gpu_proof.sh # some parts only (tests decode table serve limits cold)
# 1. tests: the paged cache's GPU tests at phi-2's published shape (random weights, CUDA graphs): rows of
#    20 to 1,800 tokens joining and leaving a 64-row batch, each as alone; rows preempted when the blocks
#    run short and resumed, greedy and seeded, each as alone; a seeded row the same from generate, stream
#    and a busy batch; the Triton kernels through the block table against a float64 reference; the server's
#    scheduler under a burst of 200; a server loading on the default device and memory cap;
# 2. decode: benchmarks/llm_decode.py --quick (batch 1 and 128), this tree and BEFORE in turn, twice;
# 2b. table: benchmarks/block_table_study.py (TABLE_ARGS: its options, e.g. "--batches 1"), the attention kernels reading the block table per tile
#    (in use) against the row's whole table once (AttentionConfig.table_once) and consecutive blocks found by
#    arithmetic (.consecutive): kernels alone and generate; with BEFORE, the slot cache's kernels alone too;
# 2c. profile (not in the default PARTS): benchmarks/step_profile.py at batch 1, this tree and BEFORE: the
#    GPU's busy time per step against the wall time, and the kernels taking it;
# 3. serve: benchmarks/serve_load.py at 64 clients (200-token answers) with the engine's batch-64 bar;
# 4. limits: serve_load.py --gpu-memory 16GiB 40GiB: 64 clients of 1,300-token requests against a server held
#    to 16 GiB (the article's T4) and 40 GiB (an A100 40GB);
# 5. cold: benchmarks/cold_ask_rounds.py, this tree against BEFORE (a cold `ask` no slower);
# 6. finetune (issue 30, not in the default PARTS): benchmarks/finetune_speed.py, our trainer against
#    peft + transformers' Trainer, tokens/s and peak memory at sequence 512.
# Parts 1, 2 and 5 with BEFORE are issue 31's proof too (serve_load within 3%, the cold ask no slower,
# the seeded row the same from generate, stream and a busy batch).
# Figures go to stdout and, when OUT is set, to $OUT.
# A session's 30 device minutes and a call's 10 do not hold it all: split it by PARTS, and where one part
# of both trees is too long for a call (serve: up to 7 minutes a tree), run the older tree's alone from
# its checkout: (cd /path/to/older/checkout && PARTS=serve bash /path/to/this/benchmarks/paged_gpu_proof.sh).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
HERE="$PWD"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$HERE"
OUT="${OUT:-$(mktemp -d)}"
PARTS="${PARTS:-tests decode table serve limits cold}"
BEFORE="${BEFORE:-}"
[ -n "$BEFORE" ] && BEFORE="$(cd "$BEFORE" && pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
want() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
# the same command in another tree: its pipeline/ and benchmarks/ first on the path
in_tree() { local tree="$1"; shift; (cd "$tree" && PYTHONPATH="${PYTHONPATH/$HERE/$tree}" "$@"); }

if want tests; then
  timeout "${TEST_SECONDS:-420}" python -m pytest -q -rs -x tests/llm/test_fast_batch_gpu.py \
    tests/llm/test_fast_batch.py tests/llm/test_fast_generate.py tests/llm/test_multi_lora.py tests/test_direct_weights_gpu.py \
    tests/llm/test_hardware.py tests/serve/test_serve_gpu.py \
    tests/serve/test_scheduler.py ${EXTRA_TESTS:-} 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
fi
if want decode; then
  for round in $(seq "${DECODE_ROUNDS:-2}"); do
    for tree in "$HERE" $BEFORE; do
      echo "== llm_decode --quick, round $round, $tree"
      # any other process on the GPU (a test's leftover server) would slow this tree's figures
      nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader | tee -a "$OUT/decode.txt"
      in_tree "$tree" timeout 300 python benchmarks/llm_decode.py --quick --skip-transformers 2>&1 \
        | grep -E "^\| FastPhiEngine|prefill|peak" | tee -a "$OUT/decode.txt"
    done
  done
fi
if want table; then
  echo "== block table study (per tile against once per row)"
  timeout 420 python benchmarks/block_table_study.py ${TABLE_ARGS:-} 2>&1 | grep --line-buffered "^table study" | tee "$OUT/table.txt"
  [ -n "$BEFORE" ] && in_tree "$BEFORE" timeout 120 python "$HERE/benchmarks/slot_kernels.py" 2>&1 \
    | grep "^table study" | tee -a "$OUT/table.txt"
fi
if want profile; then
  for tree in "$HERE" $BEFORE; do
    echo "== step profile, batch 1, $tree"
    in_tree "$tree" timeout 200 python "$HERE/benchmarks/step_profile.py" --batch 1 2>&1 | grep "^step profile" \
      | tee -a "$OUT/profile.txt"
  done
fi
if want serve; then
  for tree in "$HERE" $BEFORE; do
    echo "== serve_load, 64 clients, $tree"
    in_tree "$tree" timeout 420 python benchmarks/serve_load.py --clients 64 --rounds "${ROUNDS:-3}" \
      --mixed-clients 0 --models /tmp/serve-load-published 2>&1 | grep -v "Loading weights\|Writing model" \
      | tail -12 | tee -a "$OUT/serve.txt"
  done
fi
if want limits; then
  echo "== serve_load --gpu-memory 16GiB 40GiB"
  timeout 540 python benchmarks/serve_load.py --skip-load --gpu-memory 16GiB 40GiB \
    --models /tmp/serve-load-published 2>&1 | grep -v "Loading weights\|Writing model" | tail -14 | tee "$OUT/limits.txt"
fi
if want cold && [ -n "$BEFORE" ]; then
  echo "== cold ask, this tree against $BEFORE (a throwaway round first fills the caches)"
  (cd benchmarks && timeout 200 python cold_start.py --root /tmp/cold --answer-tokens 64 --help-runs 1 --no-server \
    --top 3 > /dev/null 2>&1; timeout 400 python cold_ask_rounds.py --root /tmp/cold --trees "$HERE,$BEFORE" \
    --rounds "${COLD_ROUNDS:-3}") 2>&1 | tail -14 | tee "$OUT/cold.txt"
fi
if want finetune; then
  echo "== finetune_speed (our trainer against peft + transformers' Trainer)"
  timeout "${FINETUNE_SECONDS:-540}" python benchmarks/finetune_speed.py 2>&1 | tail -20 | tee "$OUT/finetune.txt"
fi
