#!/usr/bin/env bash
# The kernel helper's GPU batch: GPU tests of the Triton kernels, per-kernel micro-benchmarks,
# whole-model decode and prefill benchmarks (20b shape, random weights), then a compact table.
#
#   bash bench/gpu_kernels.sh [all|tests|kernels|decode|prefill] [--quick]
#
# Logs and result JSON lines go to $OUT (default: /tmp/gpu_kernels). Each stage runs under its own
# timeout so one hang does not eat the whole GPU slot; stages can be run in separate calls.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-all}"
QUICK="${2:-}"
PY="${PYTHON:-python}"
export OUT="${OUT:-/tmp/gpu_kernels}"
mkdir -p "$OUT"
STATUS=()

stage() {  # name, timeout seconds, command...
  local name="$1" limit="$2"
  shift 2
  echo "=== $name: $*" | tee -a "$OUT/run.log"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/run.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"

if [[ "$STAGE" == all || "$STAGE" == tests ]]; then
  stage tests 420 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_gpu.py
fi
if [[ "$STAGE" == all || "$STAGE" == kernels ]]; then
  stage kernels 480 $PY -m bench.kernels --tune $QUICK
fi
if [[ "$STAGE" == all || "$STAGE" == decode ]]; then
  if [[ -n "$QUICK" ]]; then
    stage decode 480 $PY -m bench.decode --shape 20b --contexts 1024,4096,32768 --batches 1,8,32 --profile
  else
    stage decode 540 $PY -m bench.decode --shape 20b --profile
  fi
fi
if [[ "$STAGE" == all || "$STAGE" == prefill ]]; then
  stage prefill 420 $PY -m bench.prefill --shape 20b --profile
fi

echo "=== summary (this run: $OUT/*.jsonl)"
$PY -m bench.summary "$OUT/kernels.jsonl" "$OUT/decode.jsonl" "$OUT/prefill.jsonl"
printf '%s\n' "${STATUS[@]}"
