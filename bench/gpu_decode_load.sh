#!/usr/bin/env bash
# One GPU call for the decode path and the loaded server (a lease has few calls): GPU tests of the
# kernels the decode step uses, the dense GEMV against cuBLAS, the MoE GEMV candidates at one
# token, single-stream decode with the dense GEMV on and off and with programmatic dependent
# launch off and on (overlapped steps too), the MoE layer and a batch-1 kernel timeline with PDL,
# then the server under load. Each stage has a time limit (the default stages together ≤ 590 s:
# one runner command); a table of what ran is printed last.
#
#   GPTOSS_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_decode_load.sh
#   STAGES=tests,dense …   LOAD_LEVELS=256,512 LOAD_REQUESTS=2048,3072 …   (a subset; levels)
#
# GPTOSS_COMMIT is required: the GPU machine's copy of the tree has no .git. Logs go to $WORK
# (default /tmp/gpu_decode_load), the load stage's files to $WORK/load (bench/gpu_load.sh), the
# result rows this run added to $WORK/new-<name>.jsonl; with $OUT set (the GPU runner returns at
# most 8 files) everything is packed into $OUT/run.tgz after each stage, and bench.common.record
# also appends its rows to $OUT/<name>.jsonl. Append the new-*.jsonl rows to bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${GPTOSS_COMMIT:?set GPTOSS_COMMIT to the commit of the tree, the GPU machine has no .git}"
export GPTOSS_COMMIT
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
WORK="${WORK:-/tmp/gpu_decode_load}"
# The default stages' limits add up to 570 s (one runner command allows 600); the others
# (tests_moe, decode_pdl, decode_pdl_nopf, decode_rope, moe_pdl, timeline_pdl, moe_sw,
# moe_prefill2, moe_tk, access, norm_gemv) run when named in STAGES.
STAGES="${STAGES:-tests,dense,moe1,decode,decode_cublas,load}"
mkdir -p "$WORK/load"
declare -A BEFORE
for f in bench/results/*.jsonl; do BEFORE[$f]=$(wc -l < "$f"); done
STATUS=()

pack() {  # the rows this run appended, and everything packed for the runner (after each stage,
  # so a call cut off by its time limit still returns what ran; .part then mv: never truncated)
  for f in bench/results/*.jsonl; do
    tail -n "+$(( ${BEFORE[$f]:-0} + 1 ))" "$f" > "$WORK/new-$(basename "$f")"
  done
  printf '%s\n' "${STATUS[@]}" > "$WORK/status.txt"
  if [[ -n "${OUT:-}" ]]; then
    tar czf "$OUT/run.tgz.part" -C "$WORK" . && mv "$OUT/run.tgz.part" "$OUT/run.tgz"
  fi
}

stage() {  # name, time limit (s), command…
  local name="$1" limit="$2" t0=$SECONDS
  shift 2
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  pack
}

nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# GPU tests with the dense GEMV on, so the runtime's graph/eager/torch comparisons go through it.
GPTOSS_DENSE_GEMV_ROWS=8 stage tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_kernel_dense_gemv.py tests/test_gpu_runtime.py tests/test_kernel_norm_fused.py \
  tests/test_kernel_norm_fused_moe.py tests/test_kernel_norm_fused_runtime.py \
  tests/test_kernel_pdl.py tests/test_kernel_dense_gemv_rope.py
stage tests_moe 50 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_moe.py \
  -k "not 4096 and not 256"
stage dense 50 $PY -m bench.dense_gemv --rows 1,2,8
SPLITS=g4_n32k256s2,g4_n32k256s4,g4_n64k256s2,g4_n32k512s2  # kernels/moe_configs_gemv.py
stage moe1 60 $PY -m bench.moe --shapes 20b --tokens 1 --sweep \
  --only "g3_n16k256,g3_n16k512,g3_n32k512,g3_n32k256w2,g3_n8k512w2,$SPLITS"
GPTOSS_PDL=0 stage decode 110 $PY -m bench.decode --shape 20b --overlap \
  --contexts 4096,32768 --batches 1,8 --batch-context 4096
GPTOSS_DENSE_GEMV_ROWS=0 stage decode_cublas 50 $PY -m bench.decode --shape 20b --overlap \
  --contexts 4096 --batches ""
# Programmatic dependent launch (kernels/pdl.py), same machine, same stages as decode.
GPTOSS_PDL=1 stage decode_pdl 110 $PY -m bench.decode --shape 20b --overlap \
  --contexts 4096,32768 --batches 1,8 --batch-context 4096
GPTOSS_PDL=1 GPTOSS_PDL_PREFETCH=0 stage decode_pdl_nopf 60 $PY -m bench.decode --shape 20b \
  --overlap --contexts 4096 --batches 1,8 --batch-context 4096
# Rope + K/V cache write as the fused-norm qkv GEMV's epilogue (kernels/dense_gemv_rope.py;
# notes/kernels.md predicts the step's saving); compare with the decode stage's 4k lines
GPTOSS_PDL=0 GPTOSS_FUSE_ROPE=1 stage decode_rope 60 $PY -m bench.decode --shape 20b --overlap \
  --contexts 4096 --batches 1,2 --batch-context 4096
stage moe_pdl 60 bash -c "GPTOSS_PDL=0 $PY -m bench.moe --shapes 20b --tokens 1,8 \
  && GPTOSS_PDL=1 $PY -m bench.moe --shapes 20b --tokens 1,8"
GPTOSS_PDL=1 stage timeline_pdl 60 $PY -m bench.diag_graph_timeline --batch 1 --contexts 4096
# GEMV scale words (kernels/moe_gemv_scales.py) and the f16 step with its loads fenced first
# (kernels/moe_gemv_fence.py), the router's one-token path (kernels/moe_router_one.py) beside
# their controls (notes/moe.md: predictions)
stage moe_sw 60 $PY -m bench.moe --shapes 20b --tokens 1,8 --sweep --only \
  g_n32k256f32fr,g_n32k256f16fr,g5_n32k256f32w,g5_n32k256f16w,g6_n32k256f16b,g6_n32k256f16bw,\
g6_n32k256f16bc,g7_n32k256f32fr1
# helper-10's prefill tiles (kernels/moe_configs_prefill.py: activations stored in MMA order,
# 128-token tiles) beside today's PREFILL_SA (notes/moe.md "Prefill GEMMs at 4096 tokens")
stage moe_prefill2 140 $PY -m bench.moe --shapes 20b --tokens 1024,4096 --sweep --only \
  m_p_pf4w_sa,p2_sa_ready,p2_m128n64,p2_m128n64k128,p2_m128n128w8
# triton_kernels' matmul_ogs beside our MoE (issue 5's optional backend): needs
# third_party/triton_kernels (bash bench/fetch_triton_kernels.sh here, `third_party` carried)
stage moe_tk 120 env PYTHONPATH="$PWD/third_party:$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  $PY -m bench.moe --shapes 20b,120b --tokens 1,8,64,4096 --triton-kernels
stage access 40 $PY -m bench.access_pattern
stage norm_gemv 40 $PY -m bench.norm_gemv
stage load 150 env SLOTS=512 LEVELS="${LOAD_LEVELS:-512}" REQUESTS="${LOAD_REQUESTS:-3072}" \
  TIME_LIMIT=30 OUT="$WORK/load" COMMIT="$GPTOSS_COMMIT" bash bench/gpu_load.sh

for f in decode decode_cublas decode_pdl decode_pdl_nopf decode_rope; do
  [[ -f "$WORK/$f.log" ]] && grep -h "^decode" "$WORK/$f.log" | sed "s/^/$f: /"
done
[[ -f "$WORK/dense.log" ]] && sed -n '/== dense GEMV/,$p' "$WORK/dense.log"
[[ -f "$WORK/norm_gemv.log" ]] && tail -n 12 "$WORK/norm_gemv.log"
[[ -f "$WORK/access.log" ]] && tail -n 16 "$WORK/access.log"
[[ -f "$WORK/moe_pdl.log" ]] && grep -h -A3 "== MoE layer summary" "$WORK/moe_pdl.log"
[[ -f "$WORK/moe_sw.log" ]] && sed -n '/== MoE layer summary/,$p' "$WORK/moe_sw.log"
[[ -f "$WORK/moe_prefill2.log" ]] && sed -n '/== MoE layer summary/,$p' "$WORK/moe_prefill2.log" \
  && grep -hE '"tokens": (1024|4096),' "$WORK/new-moe.jsonl" | grep -o '"sweep_us": {[^}]*}'
[[ -f "$WORK/moe_tk.log" ]] && sed -n '/== MoE layer summary/,$p' "$WORK/moe_tk.log"
[[ -f "$WORK/timeline_pdl.log" ]] && grep -h -A12 "^== 20b" "$WORK/timeline_pdl.log"
[[ -f "$WORK/moe1.log" ]] && sed -n '/== MoE layer summary/,$p' "$WORK/moe1.log" \
  && grep -ho '"sweep_us": {[^}]*}' "$WORK/new-moe.jsonl"
for f in tests tests_moe; do [[ -f "$WORK/$f.log" ]] && tail -n 3 "$WORK/$f.log"; done
[[ -f "$WORK/load/bench.log" ]] && tail -n 14 "$WORK/load/bench.log"
printf '%s\n' "${STATUS[@]}"
