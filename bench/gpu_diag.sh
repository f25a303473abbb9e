#!/usr/bin/env bash
# One GPU call of diagnostics (lead's, 2026-11-25): kernel compiles during serving-like steps and
# the cost of mixed steps (bench/diag_steps.py), then ncu on the MoE kernels at 1/64/256 tokens.
# Everything lands in $OUT; the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_diag}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout ${STEPS_LIMIT:-300} python -m bench.diag_steps --layers 4 --steps 40 --profile \
  > "$OUT/steps.log" 2>&1; echo "diag_steps rc=$?"
for T in ${NCU_TOKENS:-1 64 256}; do
  timeout 120 ncu --clock-control none -k 'regex:gemv|gemm' --launch-skip 6 --launch-count 3 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section LaunchStats --section SchedulerStats \
    python -m bench.diag_moe_ncu --tokens "$T" > "$OUT/ncu_T$T.txt" 2>&1
  echo "ncu T=$T rc=$?"
done
for T in ${NCU_TOKENS:-1 64 256}; do
  echo "== ncu T=$T =="
  grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Issue Slot|No Eligible|Grid Size|Block Size|Waves Per SM|L2 Hit|Dynamic Shared" \
    "$OUT/ncu_T$T.txt" | head -80
done
echo "== diag_steps =="
cat "$OUT/steps.log" | grep -v Warning | tail -150
