#!/usr/bin/env bash
# The MoE kernels' GPU batch (issue 5), for one H100 session: GPU tests at real shapes (PTX
# dequantization exact, every candidate config vs the oracle, CUDA-graph replay == eager), then
# bench/moe.py with a tile-config sweep. Fits one 10-minute command (timeouts 270 s + 300 s).
# Logs and results go to $OUT (default /tmp/moe_gpu); the compact table comes last.
#   bash bench/gpu_moe.sh              # everything
#   SWEEP=0 bash bench/gpu_moe.sh      # default configs only (faster)
#   TESTS=0 bash bench/gpu_moe.sh      # benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe_gpu}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# Optional comparison: triton_kernels extracted from the vllm wheel (never committed), e.g.
# third_party/triton_kernels/ (git-ignored) or TRITON_KERNELS_PATH=<dir holding triton_kernels/>.
TK_DIR=${TRITON_KERNELS_PATH:-$PWD/third_party}
TK_FLAG=
if [ -d "$TK_DIR/triton_kernels" ]; then
  export PYTHONPATH=$TK_DIR:$PYTHONPATH
  TK_FLAG=--triton-kernels
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"

if [ "${TESTS:-1}" != 0 ]; then
  echo "== GPU tests (pytest -m gpu tests/test_kernel_moe*.py) =="
  timeout 270 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_moe.py tests/test_kernel_moe_gemv.py \
    tests/test_kernel_moe_gpu.py >"$OUT/moe_tests.log" 2>&1
  echo "pytest rc=$?"; tail -25 "$OUT/moe_tests.log"
fi

echo "== bench/moe.py =="
SWEEP_FLAG=--sweep; [ "${SWEEP:-1}" = 0 ] && SWEEP_FLAG=
timeout 300 $PY -m bench.moe $SWEEP_FLAG $TK_FLAG --out "$OUT/moe.jsonl" >"$OUT/moe_bench.log" 2>&1
echo "bench rc=$?"
grep -iE "failed|wrong|error|Traceback|unavailable" "$OUT/moe_bench.log" | head -20
if grep -q "^== MoE layer summary ==" "$OUT/moe_bench.log"; then
  sed -n '/^== MoE layer summary ==/,$p' "$OUT/moe_bench.log"
else  # cut short: the rows printed so far
  grep -E "^ *(20b|120b) " "$OUT/moe_bench.log" | tail -30
fi
