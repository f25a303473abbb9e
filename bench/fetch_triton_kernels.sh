#!/usr/bin/env bash
# The optional MoE comparison backend (issue 5, kernels/moe_triton_kernels.py): triton_kernels is
# not on PyPI; the vllm wheel vendors the copy that matches triton 3.6.0. Downloads that wheel
# without dependencies (≈ 340 MB, once, into a cache folder) and extracts only
# vllm/third_party/triton_kernels into third_party/triton_kernels (git-ignored: never committed).
# The GPU machine reaches no registry: run this here, then name `third_party` in the device call's
# carry (≈ 0.4 MB) and put it on PYTHONPATH there (bench/gpu_moe.sh does; bench.moe
# --triton-kernels times it beside our kernels).
#
#   bash bench/fetch_triton_kernels.sh            # VLLM_VERSION=0.33.0 CACHE=/tmp/vllm-wheel
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${VLLM_VERSION:-0.33.0}"
CACHE="${CACHE:-/tmp/vllm-wheel}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE" third_party
wheel=$(ls "$CACHE"/vllm-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "$wheel" ]]; then
  "$PY" -m pip download --no-deps --quiet -d "$CACHE" "vllm==$VERSION"
  wheel=$(ls "$CACHE"/vllm-"$VERSION"-*.whl | head -n 1)
fi
rm -rf third_party/triton_kernels "$CACHE/x"
"$PY" - "$wheel" "$CACHE/x" <<'PYEOF'
import sys
import zipfile

wheel, dest = sys.argv[1], sys.argv[2]
prefix = "vllm/third_party/triton_kernels/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix)]
    if not names:
        sys.exit(f"{wheel} has no {prefix}")
    z.extractall(dest, names)
print(f"{len(names)} files of {prefix}")
PYEOF
mv "$CACHE/x/vllm/third_party/triton_kernels" third_party/triton_kernels
PYTHONPATH="$PWD/third_party:$PWD" "$PY" -c \
  "from kernels.moe_triton_kernels import available; ok, why = available(); print('available' if ok else why)"
