#!/usr/bin/env bash
# The MoE kernels' GPU batch (issue 5), for one H100 session: compile check, GPU tests at real
# shapes (incl. CUDA-graph replay == eager), then bench/moe.py with a tile-config sweep.
# Logs and results go to $OUT (default /tmp/moe_gpu); the compact table comes last.
#   bash bench/gpu_moe.sh              # everything (~5 min)
#   SWEEP=0 bash bench/gpu_moe.sh      # default configs only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe_gpu}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"

echo "== GPU tests (pytest -m gpu tests/test_kernel_moe*.py) =="
timeout 420 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_moe.py \
  tests/test_kernel_moe_gpu.py >"$OUT/moe_tests.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/moe_tests.log"

echo "== bench/moe.py =="
SWEEP_FLAG=--sweep; [ "${SWEEP:-1}" = 0 ] && SWEEP_FLAG=
timeout 480 $PY -m bench.moe $SWEEP_FLAG --out "$OUT/moe.jsonl" >"$OUT/moe_bench.log" 2>&1
echo "bench rc=$?"
grep -v "^== MoE layer summary" "$OUT/moe_bench.log" | grep -iE "failed|error|Traceback" | head -20
sed -n '/^== MoE layer summary ==/,$p' "$OUT/moe_bench.log"
