#!/usr/bin/env bash
# Load figures (issue 7, part 3): `gptoss-serve serve` on a random gpt-oss-20b-shaped model on the
# GPU, then `gptoss-serve bench` against it at concurrency 1, 8, 64, 256 (ShareGPT-like lengths).
#
#   OUT=/tmp/load bash bench/gpu_load.sh                       # ~5 minutes on an H100
#   SLOTS=768 LEVELS=max REQUESTS=1536 bash bench/gpu_load.sh  # the largest concurrency that fits
#   DEVICE=cpu DTYPE=float32 SHAPE=tiny SLOTS=8 CONTEXT=256 LEVELS=1,4 REQUESTS=4,8 \
#       bash bench/gpu_load.sh                                 # smoke test of the script itself
#
# Writes to $OUT (default /tmp/gpu_load): load.jsonl (`bench: load` lines; append them to
# bench/results/load.jsonl to commit), load.json (everything), load.png (the plot), bench.log,
# serve.log, metrics.txt (the server's /metrics at the end). Every stage has a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-/tmp/gpu_load}"
SHAPE="${SHAPE:-20b}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
SLOTS="${SLOTS:-256}"
CONTEXT="${CONTEXT:-2048}"
LEVELS="${LEVELS:-1,8,64,256}"
REQUESTS="${REQUESTS:-8,32,128,512}"
WARMUP="${WARMUP:-32}"
TIME_LIMIT="${TIME_LIMIT:-40}"   # per level: no new requests after this many seconds
LOAD_LIMIT="${LOAD_LIMIT:-240}"  # weights, warm-up, kernel compiles, graph captures
BENCH_LIMIT="${BENCH_LIMIT:-300}"
mkdir -p "$OUT"
DEVICE_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
DEVICE_NAME="${DEVICE_NAME:-$DEVICE}"
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
STEP_TOKENS="${STEP_TOKENS:-$(( SLOTS > 2048 ? SLOTS : 2048 ))}"  # tokens per engine step
PREFILL_BATCH="${PREFILL_BATCH:-1536}"  # --prefill-batch-tokens
T0=$SECONDS
echo "=== $SHAPE on $DEVICE_NAME: slots $SLOTS, context $CONTEXT, step tokens $STEP_TOKENS," \
  "prefill batch $PREFILL_BATCH, levels $LEVELS, requests $REQUESTS"

rm -f "$OUT/ports.json"
$PY -m service.cli serve --random-shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --max-slots "$SLOTS" --max-context "$CONTEXT" --max-step-tokens "$STEP_TOKENS" \
  --prefill-batch-tokens "$PREFILL_BATCH" \
  --max-queue $(( 2 * SLOTS )) --grace-period 5 --port 0 --metrics-port 0 \
  --port-file "$OUT/ports.json" > "$OUT/serve.log" 2>&1 &
SERVER=$!

stop_server() {
  if kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER"
    for _ in $(seq 1 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER" 2>/dev/null
  fi
  wait "$SERVER" 2>/dev/null
}
trap stop_server EXIT

for _ in $(seq 1 120); do  # the port file appears once bound (before the model loads)
  [[ -f "$OUT/ports.json" ]] && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server exited:"; tail -n 40 "$OUT/serve.log"; exit 1; }
  sleep 1
done
[[ -f "$OUT/ports.json" ]] || { echo "no port file after 120 s"; tail -n 40 "$OUT/serve.log"; exit 1; }
read -r PORT METRICS_PORT < <($PY -c \
  "import json; p = json.load(open('$OUT/ports.json')); print(p['port'], p['metrics_port'])")
echo "=== server pid $SERVER on port $PORT (metrics $METRICS_PORT), bound after $((SECONDS - T0))s"
READY=""
while (( SECONDS - T0 < LOAD_LIMIT )); do  # loaded once GetModelInfo answers; give up if it died
  if $PY -c "import asyncio, sys; from bench.load import wait_for_server as w; \
asyncio.run(w(sys.argv[1], 5))" "127.0.0.1:$PORT" > /dev/null 2>&1; then READY=1; break; fi
  kill -0 "$SERVER" 2>/dev/null || break
done
if [[ -z "$READY" ]]; then
  echo "server not ready after $((SECONDS - T0))s:"; tail -n 40 "$OUT/serve.log"; exit 1
fi
echo "=== model loaded and warmed up after $((SECONDS - T0))s"

timeout "$BENCH_LIMIT" $PY -m service.cli bench --server "127.0.0.1:$PORT" \
  --wait 30 --concurrency "$LEVELS" --requests "$REQUESTS" --warmup "$WARMUP" \
  --time-limit "$TIME_LIMIT" --json "$OUT/load.json" --plot "$OUT/load.png" \
  --record "$OUT/load.jsonl" --device-name "$DEVICE_NAME" --commit "$COMMIT" \
  2>&1 | tee "$OUT/bench.log"
RC=${PIPESTATUS[0]}

$PY - "$METRICS_PORT" "$OUT/metrics.txt" <<'EOF' || echo "(no metrics)"
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read()
open(sys.argv[2], "wb").write(text)
EOF
grep -E "^gptoss_(step_duration_seconds_(sum|count)|batch_size_(sum|count)|cuda_graph_replays_total|generation_tokens_total|requests_total)" \
  "$OUT/metrics.txt" 2>/dev/null
stop_server
trap - EXIT
grep -E "engine ready|KV cache plan|lowered|Error|error" "$OUT/serve.log" | head -n 20
echo "=== bench rc=$RC (0: all requests completed; 3: some failed; 124: timed out) in $((SECONDS - T0))s"
ls -l "$OUT"
exit "$RC"
